"""What the two forms of Arbitrary-Rank Ablation share: trial parameters, the layer range,
and fitting every selected module (see objective.py for the objective)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from apostate.methods.adapter_edits import AdapterEdits
from apostate.methods.ara.captures import (
    ModuleCapture,
    WriterInputRecorder,
    capture_for_fitting,
    capture_summary,
    direction_pass_recorders,
)
from apostate.methods.ara.objective import Objective, ObjectiveWeights
from apostate.methods.ara.settings import AraSettings
from apostate.methods.context import BrokenEdit, MethodContext, RunInputs
from apostate.model.adapter import AdapterSlot


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


def suggest(trial, ara: AraSettings, n_layers: int) -> AraParameters:
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

    preparation = "capture module activations"

    def __init__(self, context: MethodContext):
        self.context = context
        self.adapter = context.adapter
        self.settings: AraSettings = context.settings
        self.n_layers = context.n_layers
        self.captures: dict[tuple[int, int], ModuleCapture] = context.prepared  # (slot, expert) -> capture

    @staticmethod
    def pass_observers(adapter, settings: AraSettings, keep_on) -> dict[str, WriterInputRecorder]:
        """Recorders of the writers' inputs: the residual pass reads the same prompts ARA fits to."""
        return direction_pass_recorders(adapter, settings.fit_positions, keep_on)

    @classmethod
    def prepare(cls, inputs: RunInputs) -> dict[tuple[int, int], ModuleCapture]:
        """What ARA fits to: each writer's inputs and outputs on the direction prompts (captures.py)."""
        return capture_for_fitting(inputs, cls.name)

    @staticmethod
    def prepared_summary(prepared: dict[tuple[int, int], ModuleCapture]) -> dict:
        return capture_summary(prepared)

    def suggest(self, trial) -> AraParameters:
        return suggest(trial, self.settings, self.n_layers)

    def describe(self, parameters: AraParameters) -> dict:
        return parameters.as_dict()

    def layer_profile(self, parameters: AraParameters) -> dict:
        return {"layers": [parameters.first_layer, parameters.last_layer]}

    def selected(self, parameters: AraParameters) -> Iterator[tuple[int, int, AdapterSlot, ModuleCapture]]:
        """(slot index, expert, slot, capture) of every module the trial edits (a Linear is expert 0)."""
        for (index, expert), capture in self.captures.items():
            writer = self.adapter.slots[index].writer
            if (
                writer.component in self.context.components
                and parameters.first_layer <= writer.layer <= parameters.last_layer
            ):
                yield index, expert, self.adapter.slots[index], capture

    def objective(self, capture: ModuleCapture, parameters: AraParameters) -> Objective:
        return Objective(capture, parameters.weights, self.settings.objective)

    def cap(self, edit_norm: Tensor, weight_norm: Tensor) -> float:
        """Trust-region factor for an edit (1 inside the region); raises BrokenEdit if non-finite."""
        if not torch.isfinite(edit_norm):
            raise BrokenEdit("the fitted edit is not finite")
        limit = self.settings.max_relative_edit * weight_norm
        return min(1.0, float(limit / edit_norm.clamp_min(1e-30)))
