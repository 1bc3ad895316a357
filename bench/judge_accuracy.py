"""How well each judge labels real responses: precision, recall and F1 for "refusal" and for
"broken", accuracy over all three labels, and time per 100 responses, on the hand-labelled
set bench/data/judge_labels.jsonl (responses of the demo model, base to far too strong).

    .venv/bin/python bench/judge_accuracy.py [--judge markers] [--judge model:demo]
        [--judge model:PATH_OR_ID@all] [--judge endpoint:URL#MODEL@all] [--disagreements N]

Without --judge: markers, and the demo model as judge in both scopes. A judge runs as apostate
runs it: the cheap broken checks first, then the markers, then the judge on what its scope
names (`@marker-refusals`, the default: only the marker refusals, which it confirms or
overturns; `@all`: every response, all three labels). `--disagreements N` prints N rows where
the markers and each other judge disagree, with the hand label.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from apostate.scoring.judges.markers import MarkerJudge  # noqa: E402
from apostate.scoring.judges.refined import RefinedJudge  # noqa: E402
from apostate.scoring.verdicts import Verdict  # noqa: E402
from apostate.session import open_judge  # noqa: E402
from apostate.settings import parse_command_line  # noqa: E402

LABELS = REPO / "bench" / "data" / "judge_labels.jsonl"


def make_judge(spec: str, dtype: str):
    """'markers', 'model:NAME' or 'endpoint:URL#MODEL' → a judge as a run would use it."""
    if spec == "markers":
        return MarkerJudge(parse_command_line(["demo"]).refusal_markers)
    spec, _, scope = spec.partition("@")
    kind, _, rest = spec.partition(":")
    if kind == "model":
        flags = ["--judge.kind", "model", "--judge.model", rest, "--dtypes", dtype]
    elif kind == "endpoint":
        url, _, model = rest.partition("#")
        flags = ["--judge.kind", "endpoint", "--judge.url", url, "--judge.model", model]
    else:
        sys.exit(f"judge_accuracy: unknown judge {spec!r} (markers, model:NAME, endpoint:URL#MODEL)")
    return open_judge(parse_command_line(["demo", *flags, "--judge.scope", scope or "marker-refusals"]), None)


def scores(truth: list[Verdict], predicted: list[Verdict], label: Verdict) -> tuple[float, float, float]:
    hits = sum(t == label and p == label for t, p in zip(truth, predicted, strict=True))
    said = sum(p == label for p in predicted)
    real = sum(t == label for t in truth)
    precision = hits / said if said else 0.0
    recall = hits / real if real else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", action="append", help="markers, model:NAME or endpoint:URL#MODEL (repeatable)")
    parser.add_argument("--labels", type=Path, default=LABELS)
    parser.add_argument("--dtype", default="float32", help="dtype of a model judge")
    parser.add_argument("--disagreements", type=int, default=0)
    args = parser.parse_args()
    rows = [json.loads(line) for line in args.labels.read_text(encoding="utf-8").splitlines() if line.strip()]
    truth = [Verdict(row["label"]) for row in rows]
    prompts, responses = [row["prompt"] for row in rows], [row["response"] for row in rows]
    counts = {label.value: sum(t == label for t in truth) for label in Verdict}
    print(f"{len(rows)} hand-labelled responses: " + ", ".join(f"{n} {label}" for label, n in counts.items()))

    specs = args.judge or ["markers", "model:demo", "model:demo@all"]
    results, judges = {}, {}
    for spec in specs:
        name = spec.partition("@")[0]
        if name not in judges:  # one load per judge model, whatever its scopes
            judges[name] = make_judge(spec, args.dtype)
        judge = judges[name]
        if isinstance(judge, RefinedJudge):  # the same judge model in the scope this spec names
            judge = RefinedJudge(judge.judge, judge.markers, spec.partition("@")[2] or "marker-refusals")
        start = time.perf_counter()
        results[spec] = judge.verdicts(prompts, responses)
        results[spec + " time"] = (time.perf_counter() - start) / len(rows) * 100

    header = f"{'judge':<34} {'refusal P':>9} {'R':>5} {'F1':>5}   {'broken P':>8} {'R':>5} {'F1':>5}   {'accuracy':>8} {'s/100':>7}"
    print("\n" + header)
    for spec in specs:
        predicted = results[spec]
        refusal = scores(truth, predicted, Verdict.REFUSAL)
        broken = scores(truth, predicted, Verdict.BROKEN)
        accuracy = sum(t == p for t, p in zip(truth, predicted, strict=True)) / len(rows)
        print(
            f"{spec:<34} {refusal[0]:>9.2f} {refusal[1]:>5.2f} {refusal[2]:>5.2f}   "
            f"{broken[0]:>8.2f} {broken[1]:>5.2f} {broken[2]:>5.2f}   {accuracy:>8.2f} {results[spec + ' time']:>7.2f}"
        )
    if args.disagreements and "markers" in results:
        for spec in [s for s in specs if s != "markers"]:
            print(f"\nWhere markers and {spec} disagree (hand label first):")
            shown = 0
            for row, mark, other in zip(rows, results["markers"], results[spec], strict=True):
                if mark != other and shown < args.disagreements:
                    shown += 1
                    print(f"- [{row['label']}] markers {mark.value}, {spec} {other.value}: {row['prompt'][:70]!r}")
                    print(f"    {row['response'][:160]!r}")


if __name__ == "__main__":
    main()
