"""How KL measured at the first token, and along the first k tokens of the base model's own answers,
rank a finished run's Pareto trials against their capability losses (lm-eval, same items):
the evidence for the default of `kl_tokens`.

    .venv/bin/python bench/kl_ranks.py RUN_DIR [--k 4 16 64] [--tasks arc_easy hellaswag piqa]
        [--items 40] [--max-trials 10] [--config examples/demo-quick.toml]

RUN_DIR: a finished run of the config (its start-up is reused; no trial is run). For each Pareto
trial (and the base model): KL on the harmless evaluation prompts at k = 1 and each --k, teacher-
forced along the base model's greedy answers (one pass per trial); the accuracy difference on each
task. Prints a row per trial, then Spearman's rank correlation of each KL with the mean accuracy
drop over the tasks (higher: that KL predicts capability damage better). With --floor-items N:
each trial's accuracy on the capability floor's items ([capability_floor], apostate's own
teacher-forced scorer), its seconds per trial, and which trials a floor at --floor-max-drop
would have made infeasible (the pick among the rest).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import optuna
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from apostate.capabilities.floor import CapabilityFloor  # noqa: E402
from apostate.capabilities.harness import data_folder, item_scores  # noqa: E402
from apostate.capabilities.settings import CapabilityFloorSettings, CapabilitySettings  # noqa: E402
from apostate.model.sources import resolve_source  # noqa: E402
from apostate.monitor import PhaseMonitor  # noqa: E402
from apostate.search.pareto import pareto_trials  # noqa: E402
from apostate.search.trial_record import TrialRecord  # noqa: E402
from apostate.session import start_session  # noqa: E402
from apostate.settings import parse_command_line  # noqa: E402


def ranks(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for position in range(i, j + 1):
            result[order[position]] = (i + j) / 2
        i = j + 1
    return result


def spearman(a: list[float], b: list[float]) -> float:
    ra, rb = ranks(a), ranks(b)
    mean_a, mean_b = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - mean_a) * (y - mean_b) for x, y in zip(ra, rb, strict=True))
    var_a = sum((x - mean_a) ** 2 for x in ra)
    var_b = sum((y - mean_b) ** 2 for y in rb)
    return cov / (var_a * var_b) ** 0.5 if var_a and var_b else float("nan")


def kl_rows(base_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The KL at each answer position."""
    return F.kl_div(rows, base_rows, reduction="none", log_target=True).sum(-1)


def kl_at(per_position: list[torch.Tensor], k: int) -> float:
    return sum(float(p[:k].mean()) for p in per_position) / len(per_position)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--k", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--tasks", nargs="+", default=["arc_easy", "hellaswag", "piqa"])
    parser.add_argument("--items", type=int, default=40)
    parser.add_argument("--max-trials", type=int, default=10)
    parser.add_argument("--config", default=str(REPO / "examples/demo-quick.toml"))
    parser.add_argument("--floor-items", type=int, default=20)
    parser.add_argument("--floor-tasks", nargs="+", default=["hellaswag"])
    parser.add_argument("--floor-max-drop", type=float, default=0.05)
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    settings = parse_command_line(["demo", "--config", args.config, "--run-dir", str(args.run_dir)])
    source = resolve_source(settings.model, None, settings.cache_path())
    session = start_session(settings, source, args.run_dir, PhaseMonitor())
    capabilities = CapabilitySettings(tasks=args.tasks, items=args.items)
    loaded, scorer = session.loaded, session.scorer
    longest = max(args.k)

    session.method.reset()
    answers = scorer.harmless.greedy_tokens(session.model, longest - 1)
    continued = scorer.harmless.continued(answers)
    base_rows = continued.answer_logprobs(session.model)
    start = time.perf_counter()
    base_scores = item_scores(session.model, loaded.tokenizer, capabilities, loaded.device)
    print(f"base model: {time.perf_counter() - start:.0f} s of benchmarks", flush=True)

    floor = None
    if args.floor_items:
        floor_settings = CapabilityFloorSettings(items=args.floor_items, tasks=args.floor_tasks)
        folder = data_folder(capabilities)
        floor = CapabilityFloor.measure(
            session.model, loaded.tokenizer, floor_settings, folder, session.startup.batch_size, loaded.device
        )
    front = sorted(pareto_trials(session.study), key=lambda t: TrialRecord.of(t).kl)
    if len(front) > args.max_trials:  # spread over the front's KL range
        step = (len(front) - 1) / (args.max_trials - 1)
        front = [front[round(i * step)] for i in range(args.max_trials)]
    columns = ["KL@1", *(f"KL@{k}" for k in args.k)]
    rows = []
    print(
        "trial  refusals  " + "  ".join(f"{c:>8}" for c in columns) + "  " + "  ".join(f"{t:>10}" for t in args.tasks)
    )
    for trial in front:
        session.restore(trial)
        per_position = continued.answer_logprobs(session.model, reduce=lambda i, rows: kl_rows(base_rows[i], rows))
        kls = [kl_at(per_position, 1), *(kl_at(per_position, k) for k in args.k)]
        scores = item_scores(session.model, loaded.tokenizer, capabilities, loaded.device)
        drops = [(sum(base_scores[t]) - sum(scores[t])) / len(base_scores[t]) for t in args.tasks]
        rows.append((trial.number, kls, drops))
        record = TrialRecord.of(trial)
        if floor is not None:
            mark = time.perf_counter()
            accuracy = floor.scorer.accuracy(session.model, session.method.edited_layers())
            verdict = "infeasible" if floor.excess(accuracy) > 0 else "kept"
            print(
                f"  floor: accuracy {accuracy:.3f} (base {floor.base_accuracy:.3f}) in "
                f"{time.perf_counter() - mark:.1f} s: {verdict}",
                flush=True,
            )
        print(
            f"{trial.number:>5}  {record.refusals:>4}/{record.total:<3}  "
            + "  ".join(f"{v:8.4f}" for v in kls)
            + "  "
            + "  ".join(f"{d:+10.3f}" for d in drops),
            flush=True,
        )
    mean_drop = [sum(d) / len(d) for _, _, d in rows]
    print("\nSpearman rank correlation with the mean accuracy drop over the tasks:")
    for index, column in enumerate(columns):
        values = [kls[index] for _, kls, _ in rows]
        per_task = ", ".join(
            f"{task} {spearman(values, [d[t] for _, _, d in rows]):+.2f}" for t, task in enumerate(args.tasks)
        )
        print(f"  {column:>6}: {spearman(values, mean_drop):+.2f}   ({per_task})")
    session.close()


if __name__ == "__main__":
    main()
