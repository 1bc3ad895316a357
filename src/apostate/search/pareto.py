"""The Pareto front of a study: as data (pareto.json), as a table, and as a plot."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import optuna
from rich.table import Table

from ..progress import console
from .study import completed


@dataclass(frozen=True)
class BaseScores:
    """The unedited model on the evaluation sets."""

    refusals: int
    total: int

    @property
    def refusal_rate(self) -> float:
        return self.refusals / self.total


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials no other trial beats on both refusal rate and KL, fewest refusals first."""
    front = [t for t in study.best_trials if t.state == optuna.trial.TrialState.COMPLETE]
    return sorted(front, key=lambda t: (t.user_attrs["refusals"], t.user_attrs["kl"]))


def trial_record(trial: optuna.trial.FrozenTrial) -> dict:
    attrs = trial.user_attrs
    return {
        "number": trial.number,
        "refusals": attrs["refusals"],
        "total": attrs["total"],
        "refusal_rate": attrs["refusals"] / attrs["total"],
        "kl": attrs["kl"],
        "parameters": attrs["parameters"],
        "seconds": attrs.get("seconds"),
    }


def write_pareto(study: optuna.Study, run_dir: Path, base: BaseScores, model_name: str) -> Path:
    path = run_dir / "pareto.json"
    data = {
        "model": model_name,
        "base_refusals": base.refusals,
        "base_total": base.total,
        "base_refusal_rate": base.refusal_rate,
        "completed_trials": len(completed(study)),
        "pareto": [trial_record(t) for t in pareto_trials(study)],
    }
    scratch = path.with_suffix(".json.partial")
    scratch.write_text(json.dumps(data, indent=2))
    scratch.replace(path)
    return path


def print_front(study: optuna.Study, base: BaseScores) -> None:
    table = Table(
        title=f"Pareto front ({len(completed(study))} trials; base model refuses {base.refusals}/{base.total})"
    )
    table.add_column("Trial", justify="right")
    table.add_column("Refusals", justify="right")
    table.add_column("Rate", justify="right")
    table.add_column("KL divergence", justify="right")
    table.add_column("Parameters")
    for trial in pareto_trials(study):
        attrs = trial.user_attrs
        table.add_row(
            str(trial.number),
            f"{attrs['refusals']}/{attrs['total']}",
            f"{attrs['refusals'] / attrs['total']:.1%}",
            f"{attrs['kl']:.4f}",
            parameter_summary(attrs["parameters"]),
        )
    console.print(table)


def parameter_summary(parameters: dict) -> str:
    """A few words on a trial's parameters, whatever its method."""
    if "direction_index" in parameters:
        index = parameters["direction_index"]
        return f"direction {index:.2f}" if isinstance(index, float) else "per-layer directions"
    if "layers" in parameters:
        first, last = parameters["layers"]
        return (
            f"layers {first}-{last}, steer {parameters['steer_weight']:.2f}, "
            f"overcorrect {parameters['overcorrect_weight']:.2f}"
        )
    return ""


def plot_front(study: optuna.Study, base: BaseScores, path: Path) -> Path:
    """All trials as points (KL on a log axis), the Pareto front as a line, the base model's rate dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = completed(study)
    front = pareto_trials(study)
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.scatter(
        [max(t.user_attrs["kl"], 1e-6) for t in trials],
        [t.values[0] for t in trials],
        s=14,
        alpha=0.5,
        label="trials",
    )
    ordered = sorted(front, key=lambda t: t.user_attrs["kl"])
    axes.plot(
        [max(t.user_attrs["kl"], 1e-6) for t in ordered],
        [t.values[0] for t in ordered],
        "o-",
        color="crimson",
        label="Pareto front",
    )
    axes.axhline(base.refusal_rate, linestyle="--", color="gray", label="base model")
    axes.set_xscale("log")
    axes.set_xlabel("KL divergence from the base model (harmless prompts)")
    axes.set_ylabel("refusal rate (harmful prompts)")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
