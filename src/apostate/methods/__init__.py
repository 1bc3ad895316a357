"""Ablation methods, registered by name. Each one samples a trial's parameters and writes its
edit into the model (through the LoRA adapter, or in place with an in-memory copy to reset
from); the trial loop, scoring, study, Pareto selection and export are shared."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from ..architecture import WriterEdit
from .ara import AraMethod
from .ara_lora import AraLoraMethod
from .context import BrokenEdit, MethodContext
from .directional import DirectionalMethod


class Method(Protocol):
    name: str
    needs_captures: bool  # fitted to captured module inputs and outputs (see captures.py)
    edits_in_adapter: bool  # the LoRA adapter alone holds the edit (so it can be saved on its own)

    @staticmethod
    def adapter_rank(settings) -> int:
        """Rank of the LoRA slots the method writes into."""

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


METHODS: dict[str, type] = {
    "directional": DirectionalMethod,
    "ara": AraMethod,
    "ara-lora": AraLoraMethod,
}

__all__ = ["METHODS", "BrokenEdit", "Method", "MethodContext"]
