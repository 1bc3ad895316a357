"""What the session, the trial loop and the report need of a method, and loading one by name."""

from __future__ import annotations

from collections.abc import Iterator
from importlib import import_module
from typing import Protocol

import optuna
from pydantic import BaseModel

from apostate.decoding.batching import PassObserver
from apostate.methods import METHODS
from apostate.methods.context import MethodContext, RunInputs
from apostate.model.adapter import Adapter
from apostate.model.architecture import WriterEdit


class Method(Protocol):
    name: str
    edits_in_adapter: bool  # the LoRA adapter alone holds the edit (so it can be saved on its own)
    preparation: str | None  # what `prepare` does, as a phase name; None: it prepares nothing

    def __init__(self, context: MethodContext) -> None: ...

    @staticmethod
    def adapter_rank(settings: BaseModel) -> int:
        """Rank of the LoRA slots the method writes into, given its settings table."""

    @staticmethod
    def pass_observers(adapter: Adapter, settings: BaseModel, keep_on) -> dict[str, PassObserver]:
        """Per side ("harmless", "harmful"), what the start-up's residual pass over the direction
        prompts should carry for `prepare` (RunInputs.recorded); {} for nothing."""

    @staticmethod
    def prepare(inputs: RunInputs) -> object:
        """What the method computes once per run, before any trial (MethodContext.prepared)."""

    @staticmethod
    def prepared_summary(prepared: object) -> dict:
        """A few JSON-plain numbers of `prepared`, enough for another worker to check that its own
        preparation is the same without shipping it ({} when there is nothing to compare)."""

    def suggest(self, trial) -> object:
        """Sample (or, given a FixedTrial, rebuild) one trial's parameters."""

    def reset(self) -> None:
        """Give back the base model exactly."""

    def apply(self, parameters) -> None:
        """Write the edit for `parameters` into the (reset) model; BrokenEdit if it is unusable."""

    def deltas(self) -> Iterator[WriterEdit]:
        """The current edit per writer (float32 when computed, in the layout of the writer's parameter)."""

    def edited_layers(self) -> set[int]:
        """The decoder layers the current edit changes (the layers below the first are the base's)."""

    def describe(self, parameters) -> dict:
        """The parameters as plain data, for pareto.json and model cards."""

    def layer_profile(self, parameters) -> dict:
        """How the edit is drawn over layers, for the report: {"weights": {component: [weight per
        layer]}} where the method has a per-layer weight, {"layers": [first, last]} where it edits a
        range; {} when neither."""


def method_class(name: str) -> type[Method]:
    """The method registered as `name` (settings validate the name, so it is always known)."""
    module, _, cls = METHODS[name][0].partition(":")
    return getattr(import_module(module), cls)


def restore(method: Method, params: dict) -> None:
    """Put the model in the state of a finished trial's `params` (no reload: reset, then re-apply)."""
    method.reset()
    method.apply(method.suggest(optuna.trial.FixedTrial(params)))
