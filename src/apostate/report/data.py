"""Everything a run report shows, read from the run folder alone (study, pareto.json, phases.json):
no model is loaded, so a report can be rebuilt anywhere the run folder is."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import optuna

from apostate.errors import ApostateError
from apostate.search.pareto import BaseScores, judged_counts, pareto_trials
from apostate.search.reading import load_run_study
from apostate.search.study import completed
from apostate.search.trial_record import TrialRecord

DEFAULT_PICK_MAX_KL = 0.1  # the setting's default, for a run that has not picked a trial yet


@dataclass
class RunData:
    run_dir: Path
    model_name: str
    method: str | None
    study: optuna.Study
    trials: list[optuna.trial.FrozenTrial]  # completed ones
    front: list[optuna.trial.FrozenTrial]
    base: BaseScores
    chosen: dict | None  # the study's `chosen` record (results/chosen.py)
    phases: dict | None  # phases.json

    @property
    def chosen_trial(self) -> optuna.trial.FrozenTrial | None:
        number = self.chosen["number"] if self.chosen else None
        return next((t for t in self.trials if t.number == number), None)

    @property
    def pick_max_kl(self) -> float:
        return self.chosen.get("pick_max_kl", DEFAULT_PICK_MAX_KL) if self.chosen else DEFAULT_PICK_MAX_KL

    def judged(self, number: int | str) -> dict | None:
        return judged_counts(self.study, number)

    def heldout(self, number: int) -> dict | None:
        return self.study.user_attrs.get(f"heldout_{number}")

    def gguf(self, number: int) -> dict | None:
        """The trial's GGUF export scored as shipped: {"rows", "lost", "warning"} (commands/gguf.py)."""
        return self.study.user_attrs.get(f"gguf_{number}")

    def capabilities(self, number: int) -> dict | None:
        return self.study.user_attrs.get(f"capabilities_{number}")


def load_run(run_dir: Path, study: optuna.Study | None = None) -> RunData:
    """The run in `run_dir`; its study as given, else the one the folder names (its journal, or the
    database of a shared study in its storage.json)."""
    run_dir = Path(run_dir)
    study = study or load_run_study(run_dir)
    trials = completed(study)
    if not trials:
        raise ApostateError(f"run folder {run_dir} has no finished trial yet; nothing to report")
    attrs = study.user_attrs
    pareto = _read_json(run_dir / "pareto.json") or {}
    model_name = attrs.get("model") or pareto.get("model") or run_dir.name
    method = attrs.get("method")
    base = BaseScores(attrs.get("base_refusals", 0), TrialRecord.of(trials[0]).total)
    chosen = attrs.get("chosen")
    front = pareto_trials(study)
    return RunData(run_dir, model_name, method, study, trials, front, base, chosen, _read_json(run_dir / "phases.json"))


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
