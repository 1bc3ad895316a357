"""What the two forms of Arbitrary-Rank Ablation share: trial parameters, the layer range,
and fitting every selected module (see objective.py for the objective)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ...model.adapter import AdapterSlot
from ..adapter_edits import AdapterEdits
from ..context import BrokenEdit, MethodContext
from .captures import ModuleCapture
from .objective import Objective, ObjectiveWeights

if TYPE_CHECKING:
    from ...settings import Settings


@dataclass(frozen=True)
class AraParameters:
    first_layer: int
    last_layer: int
    weights: ObjectiveWeights

    def as_dict(self) -> dict:
        return {
            "layers": [self.first_layer, self.last_layer],
            "preserve_weight": self.weights.preserve,
            "steer_weight": self.weights.steer,
            "overcorrect_weight": self.weights.overcorrect,
            "temperature": self.weights.temperature,
            "neighbours": self.weights.neighbours,
        }


def suggest(trial, settings: Settings, n_layers: int) -> AraParameters:
    ara = settings.ara
    last = n_layers - 1
    start = trial.suggest_float("layer_start", ara.layer_start[0] * last, ara.layer_start[1] * last)
    span = trial.suggest_float("layer_span", ara.layer_span[0] * last, ara.layer_span[1] * last)
    preserve = trial.suggest_float("preserve_weight", *ara.preserve_weight, log=ara.preserve_weight[0] > 0)
    steer = trial.suggest_float("steer_weight", *ara.steer_weight)
    overcorrect = trial.suggest_float("overcorrect_weight", *ara.overcorrect_weight)
    temperature, neighbours = 0.0, 0
    if ara.objective == "smooth":
        temperature = trial.suggest_float("temperature", *ara.temperature, log=ara.temperature[0] > 0)
    else:
        neighbours = trial.suggest_int("neighbours", *ara.neighbours)
    first = round(start)
    weights = ObjectiveWeights(preserve, steer, overcorrect, temperature, neighbours)
    return AraParameters(first, min(last, round(start + span)), weights)


class AraMethodBase(AdapterEdits):
    """Fits each selected module's edit; subclasses say how an edit is parametrized and stored."""

    def __init__(self, context: MethodContext):
        self.context = context
        self.adapter = context.adapter
        self.settings = context.settings
        self.n_layers = context.n_layers

    needs_captures = True

    def suggest(self, trial) -> AraParameters:
        return suggest(trial, self.settings, self.n_layers)

    def describe(self, parameters: AraParameters) -> dict:
        return parameters.as_dict()

    def selected(self, parameters: AraParameters) -> Iterator[tuple[int, int, AdapterSlot, ModuleCapture]]:
        """(slot index, expert, slot, capture) of every module the trial edits (a Linear is expert 0)."""
        for (index, expert), capture in self.context.captures.items():
            writer = self.adapter.slots[index].writer
            if (
                writer.component in self.context.components
                and parameters.first_layer <= writer.layer <= parameters.last_layer
            ):
                yield index, expert, self.adapter.slots[index], capture

    def objective(self, capture: ModuleCapture, parameters: AraParameters) -> Objective:
        return Objective(capture, parameters.weights, self.settings.ara.objective)

    def cap(self, edit_norm: Tensor, weight_norm: Tensor) -> float:
        """Trust-region factor for an edit (1 inside the region); raises BrokenEdit if non-finite."""
        if not torch.isfinite(edit_norm):
            raise BrokenEdit("the fitted edit is not finite")
        limit = self.settings.ara.max_relative_edit * weight_norm
        return min(1.0, float(limit / edit_norm.clamp_min(1e-30)))
