"""Compare finished runs side by side: time per trial, KL distribution, Pareto front.

    python bench/fronts.py runs/demo-directional runs/demo-ara runs/demo-ara-lora

Reads each run folder's Optuna journal (nothing is re-run). Infeasible (pruned) trials count
in the KL distribution with the KL they measured.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

optuna.logging.set_verbosity(optuna.logging.WARNING)


def load(run_dir: Path) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(run_dir / "study.journal")))
    return optuna.load_study(study_name="apostate", storage=storage)


def quantiles(values: list[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return f"min {ordered[0]:.3g}  median {pick(0.5):.3g}  p90 {pick(0.9):.3g}  max {ordered[-1]:.3g}"


def report(run_dir: Path) -> None:
    study = load(run_dir)
    trials = study.get_trials(states=[TrialState.COMPLETE, TrialState.PRUNED])
    scored = [t for t in trials if t.state == TrialState.COMPLETE]
    kls = [t.user_attrs["kl"] for t in trials if "kl" in t.user_attrs]
    seconds = [t.user_attrs["seconds"] for t in trials if "seconds" in t.user_attrs]
    base = study.user_attrs.get("base_refusals")
    total = scored[0].user_attrs["total"] if scored else 0
    print(f"== {run_dir}  ({study.user_attrs.get('fingerprint', {}).get('method', '?')})")
    beaten = sum("dominated" in t.user_attrs for t in trials)
    infeasible = len(trials) - len(scored) - beaten
    print(
        f"   trials: {len(trials)} ({infeasible} infeasible, {beaten} stopped once beaten); base refuses {base}/{total}"
    )
    if seconds:
        for phase in ("edit", "kl", "refusals", "total"):
            values = [s[phase] for s in seconds if phase in s]
            if values:
                print(f"   {phase:>8}: median {statistics.median(values):6.2f} s")
    print(
        f"   KL over all trials: {quantiles(kls)};  above 5: {sum(k > 5 for k in kls)}, above 1: {sum(k > 1 for k in kls)}"
    )
    front = sorted(study.best_trials, key=lambda t: t.user_attrs["kl"]) if scored else []
    print("   Pareto front (trial: refusals, KL):")
    for trial in front:
        print(f"     {trial.number:>3}: {trial.user_attrs['refusals']:>3}/{total}  KL {trial.user_attrs['kl']:.4f}")
    best = [t for t in scored if t.user_attrs["kl"] <= 0.1]
    if best:
        top = min(best, key=lambda t: (t.user_attrs["refusals"], t.user_attrs["kl"]))
        print(
            f"   best at KL <= 0.1: trial {top.number}, {top.user_attrs['refusals']}/{total}, KL {top.user_attrs['kl']:.4f}"
        )


if __name__ == "__main__":
    for argument in sys.argv[1:]:
        report(Path(argument))
