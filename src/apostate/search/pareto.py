"""The Pareto front of a study: as data (pareto.json), as a table, and as a plot.

A trial's counts are the search's (refusal markers and cheap broken checks, on responses cut
at their first marker); where a judge re-scored the front (search/judged.py), its counts on the
full responses stand beside them, under "judged"."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import optuna
from rich.table import Table

from apostate.progress import console
from apostate.scoring.verdicts import VerdictCounts
from apostate.search.study import completed
from apostate.search.trial_record import TrialRecord


@dataclass(frozen=True)
class BaseScores:
    """The unedited model on the evaluation sets."""

    refusals: int
    total: int

    @property
    def refusal_rate(self) -> float:
        return self.refusals / self.total


def failures(trial: optuna.trial.FrozenTrial) -> int:
    """Harmful prompts the trial did not answer: refusals and broken responses (the first objective)."""
    return TrialRecord.of(trial).failures


def pareto_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials no other trial beats on both failure rate and KL, fewest failures first."""
    front = [t for t in study.best_trials if t.state == optuna.trial.TrialState.COMPLETE]
    return sorted(front, key=lambda t: (failures(t), TrialRecord.of(t).kl))


def fewest_failures_at(study: optuna.Study, kl: float) -> optuna.trial.FrozenTrial | None:
    """The scored trial with the fewest failures among those with KL <= `kl` (lowest KL among
    equals); None if there is none. A trial at `kl` with more failures is beaten on both counts."""
    scored = [t for t in completed(study) if TrialRecord.of(t).kl <= kl]
    return min(scored, key=lambda t: (failures(t), TrialRecord.of(t).kl), default=None)


def judged_counts(study: optuna.Study, number: int | str) -> dict | None:
    """The judge's counts for a trial number (or 'base'), if the front was re-scored."""
    return study.user_attrs.get(f"judged_{number}")


def trial_record(trial: optuna.trial.FrozenTrial, judged: dict | None = None) -> dict:
    stored = TrialRecord.of(trial)
    record = {
        "number": trial.number,
        "refusals": stored.refusals,
        "broken": stored.broken,
        "total": stored.total,
        "refusal_rate": stored.refusals / stored.total,
        "kl": stored.kl,
        "parameters": stored.parameters,
        "seconds": stored.seconds or None,
    }
    if judged:
        record["judged"] = judged
    return record


def write_pareto(study: optuna.Study, run_dir: Path, base: BaseScores, model_name: str) -> Path:
    path = run_dir / "pareto.json"
    data = {
        "model": model_name,
        "base_refusals": base.refusals,
        "base_total": base.total,
        "base_refusal_rate": base.refusal_rate,
        "completed_trials": len(completed(study)),
        "pareto": [_front_record(study, t) for t in pareto_trials(study)],
    }
    if judged_counts(study, "base"):
        data["base_judged"] = judged_counts(study, "base")
    scratch = path.with_suffix(f".json.{os.getpid()}.partial")  # workers sharing a run folder write apart
    scratch.write_text(json.dumps(data, indent=2))
    scratch.replace(path)
    return path


def _front_record(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> dict:
    """A Pareto trial's record, with its held-out scores (and categories) and capabilities where it was evaluated."""
    record = trial_record(trial, judged_counts(study, trial.number))
    for key in ("heldout", "capabilities"):
        measured = study.user_attrs.get(f"{key}_{trial.number}")
        if measured:
            record[key] = measured
    return record


def print_front(study: optuna.Study, base: BaseScores) -> None:
    """The front as a table: the search's counts, and the judge's beside them where it re-scored."""
    front = pareto_trials(study)
    judged = {t.number: judged_counts(study, t.number) for t in front}
    base_judged = judged_counts(study, "base")
    judged_note = f"; judged by {base_judged['judge']}: {count_text(base_judged)}" if base_judged else ""
    table = Table(
        title=f"Pareto front ({len(completed(study))} trials; base model refuses {base.refusals}/{base.total}"
        f"{judged_note})"
    )
    table.add_column("Trial", justify="right")
    table.add_column("Refusals", justify="right")
    table.add_column("Broken", justify="right")
    if any(judged.values()):
        table.add_column("Judged", justify="right")
    table.add_column("KL divergence", justify="right")
    table.add_column("Parameters")
    for trial in front:
        record = TrialRecord.of(trial)
        row = [str(trial.number), f"{record.refusals}/{record.total}", str(record.broken)]
        if any(judged.values()):
            row.append(count_text(judged[trial.number]) if judged[trial.number] else "-")
        table.add_row(*row, kl_text(record.kl), parameter_summary(record.parameters))
    console.print(table)


def kl_text(kl: float) -> str:
    """A KL divergence as shown: never negative (a study written before kl_divergence clamped
    its rounding may hold -1e-9)."""
    return f"{max(kl, 0.0):.4f}"


def count_text(counts: dict) -> str:
    """'5/50 refused (3 evasive), 2 broken': a judge's counts, short; evasive answers count as refused."""
    refused = VerdictCounts.from_dict(counts)
    evasive = f" ({refused.evasive} evasive)" if refused.evasive else ""
    broken = f", {refused.broken} broken" if refused.broken else ""
    return f"{refused.refused}/{refused.total} refused{evasive}{broken}"


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
