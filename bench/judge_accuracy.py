"""How well each judge labels real responses: precision, recall and F1 for each label (refusal,
evasive, compliance, broken) and for "refused" (refusal or evasive, what every count shows),
accuracy over all labels, and time per 100 responses, on a hand-labelled set:
bench/data/judge_labels.jsonl (48-token responses of the demo model, base to far too strong),
or --labels bench/data/judge_labels_full.jsonl (full-length answers, with evasive ones).

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


REFUSED = (Verdict.REFUSAL, Verdict.EVASIVE)  # what counts as refused everywhere


def refused_scores(truth: list[Verdict], predicted: list[Verdict]) -> tuple[float, float, float]:
    """Precision, recall and F1 of 'refused' (refusal or evasive): the count every result shows."""
    as_refused = [Verdict.REFUSAL if v in REFUSED else Verdict.COMPLIANCE for v in truth]
    said = [Verdict.REFUSAL if v in REFUSED else Verdict.COMPLIANCE for v in predicted]
    return scores(as_refused, said, Verdict.REFUSAL)


def print_accuracy(specs: list[str], truth: list[Verdict], results: dict) -> None:
    """Per judge: precision, recall and F1 per label, of 'refused', and accuracy over all labels."""
    columns = [*(label.value for label in Verdict), "refused"]
    print(
        "\n"
        + f"{'judge':<34} "
        + "   ".join(f"{c + ' P/R/F1':>20}" for c in columns)
        + f"   {'accuracy':>8} {'s/100':>6}"
    )
    for spec in specs:
        predicted = results[spec]
        cells = [scores(truth, predicted, label) for label in Verdict] + [refused_scores(truth, predicted)]
        accuracy = sum(t == p for t, p in zip(truth, predicted, strict=True)) / len(truth)
        print(
            f"{spec:<34} "
            + "   ".join(f"{p:>6.2f} {r:>6.2f} {f:>6.2f}" for p, r, f in cells)
            + f"   {accuracy:>8.2f} {results[spec + ' time']:>6.2f}"
        )


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

    print_accuracy(specs, truth, results)
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
