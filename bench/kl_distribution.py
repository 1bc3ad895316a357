"""KL divergence of every trial in two runs, side by side: before/after a change to a method.

    python bench/kl_distribution.py runs/demo-ara-lora-knn runs/demo-ara-lora --out kl.png

Prints both distributions and, for trials with the same number whose shared parameters are
equal (random start-up trials drawn with the same seed), the paired KLs; plots both as strips
on a log axis. Infeasible (pruned) trials count with the KL they measured.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fronts import load, quantiles
from optuna.trial import TrialState


def trial_kls(run_dir: Path) -> dict[int, tuple[float, dict]]:
    study = load(run_dir)
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    return {
        t.number: (t.user_attrs["kl"], t.params) for t in study.trials if t.state in states and "kl" in t.user_attrs
    }


def paired(before: dict, after: dict) -> list[tuple[int, float, float, dict]]:
    rows = []
    for number in sorted(before.keys() & after.keys()):
        params_before, params_after = before[number][1], after[number][1]
        shared = params_before.keys() & params_after.keys()
        if all(abs(params_before[name] - params_after[name]) < 1e-9 for name in shared):
            rows.append((number, before[number][0], after[number][0], {name: params_after[name] for name in shared}))
    return rows


def plot(before: dict, after: dict, labels: tuple[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 3))
    for row, kls in enumerate((before, after)):
        values = [max(kl, 1e-6) for kl, _ in kls.values()]
        axis.scatter(values, [row] * len(values), alpha=0.6)
    axis.set_xscale("log")
    axis.set_yticks([0, 1], labels)
    axis.axvline(5, color="red", linestyle="--", label="KL 5")
    axis.set_xlabel("first-token KL divergence (all trials)")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument("--out", type=Path, default=Path("kl_distribution.png"))
    args = parser.parse_args()
    before, after = trial_kls(args.before), trial_kls(args.after)
    for label, kls in ((args.before, before), (args.after, after)):
        values = [kl for kl, _ in kls.values()]
        print(f"{label}: {len(values)} trials; KL {quantiles(values)}; above 5: {sum(v > 5 for v in values)}")
    print("paired trials (same parameters): number, overcorrect, KL before, KL after")
    for number, kl_before, kl_after, params in paired(before, after):
        print(
            f"  {number:>3}  {params.get('overcorrect_weight', float('nan')):5.2f}  {kl_before:10.4g}  {kl_after:10.4g}"
        )
    plot(before, after, (args.before.name, args.after.name), args.out)
    print(f"plot: {args.out}")


if __name__ == "__main__":
    main()
