"""What a method is built from, what it may prepare once per run, and the error a method raises
for an edit that must not be scored."""

from __future__ import annotations

from dataclasses import dataclass, field

from pydantic import BaseModel
from torch import Tensor

from apostate.model.adapter import Adapter
from apostate.prompts import Texts


class BrokenEdit(Exception):
    """The edit is unusable (non-finite weights): the trial is marked infeasible, never scored."""


@dataclass
class RunInputs:
    """What a method may read once per run, before its first trial (`Method.prepare`)."""

    adapter: Adapter
    tokenizer: object
    device: object
    texts: Texts  # the run's prompts, chat-formatted
    batch_size: int
    settings: BaseModel  # the method's own settings table
    keep_activations_on: object  # "cpu", or the model's device (settings.activations_on)
    # what the method's observers recorded during the start-up's residual pass (Method.pass_observers),
    # per side; empty where that pass did not run here (measurements reused)
    recorded: dict = field(default_factory=dict)


@dataclass
class MethodContext:
    adapter: Adapter
    settings: BaseModel  # the method's own settings table
    n_layers: int
    components: list[str]  # the components the user wants edited and the model has
    directions: Tensor  # (layers + 1, hidden) refusal directions
    quantized: bool = False  # the model's weights are bitsandbytes 4-bit
    prepared: object = None  # what the method's `prepare` made for this run (Method.prepare)
