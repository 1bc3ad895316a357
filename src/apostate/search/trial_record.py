"""What a trial keeps in the study (its Optuna user attributes), read and written only through
`TrialRecord`: the names and types live here, once."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import optuna


@dataclass(frozen=True)
class TrialRecord:
    parameters: dict = field(default_factory=dict)  # the method's own description of the trial's parameters
    kl: float | None = None  # first-token KL divergence from the base model (None: the edit broke first)
    refusals: int | None = None  # marker refusals on the harmful evaluation prompts (None: infeasible)
    broken: int = 0  # broken responses among them
    total: int | None = None  # harmful evaluation prompts counted (fewer where counting stopped: `dominated`)
    seconds: dict = field(default_factory=dict)  # time per phase of the trial, "total" among them
    infeasible: str | None = None  # why the trial was pruned without counting refusals
    dominated: str | None = None  # why counting stopped early: a scored trial beats it (counts: of those finished)
    capability: float | None = None  # accuracy on the capability floor's items (where the run has a floor)
    worker: str | None = None  # which worker of a shared study ran it
    surplus: bool = False  # failed unrun: the study had all its trials started already
    heldout: dict | None = None  # held-out scores, where a run kept them on the trial (the study keeps them now)

    @classmethod
    def of(cls, trial: optuna.trial.FrozenTrial | optuna.Trial) -> TrialRecord:
        attrs = trial.user_attrs
        return cls(**{f.name: attrs[f.name] for f in fields(cls) if f.name in attrs})

    @staticmethod
    def write(trial: optuna.Trial, **values) -> None:
        """Set these attributes of a running trial (names checked against the record's fields)."""
        known = {f.name for f in fields(TrialRecord)}
        for name, value in values.items():
            if name not in known:
                raise KeyError(f"TrialRecord has no field {name!r}")
            trial.set_user_attr(name, value)

    @property
    def failures(self) -> int:
        """Harmful prompts not answered: refusals and broken responses."""
        return (self.refusals or 0) + self.broken
