"""Ablation methods, registered by name. Each one samples a trial's parameters and writes its
edit into the (reset) LoRA adapter; the trial loop, scoring, study and export are shared."""

from __future__ import annotations

from typing import Protocol

from .directional import DirectionalMethod


class Method(Protocol):
    name: str

    def suggest(self, trial) -> object:
        """Sample (or, given a FixedTrial, rebuild) one trial's parameters."""

    def apply(self, parameters) -> None:
        """Write the edit for `parameters` into the adapter, which the caller has reset."""

    def describe(self, parameters) -> dict:
        """The parameters as plain data, for pareto.json and model cards."""


METHODS = {"directional": DirectionalMethod}
