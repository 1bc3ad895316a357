"""What a method is built from, and the error a method raises for an edit that must not be scored."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

from ..model.adapter import Adapter
from .ara.captures import ModuleCapture

if TYPE_CHECKING:
    from ..settings import Settings  # apostate.settings imports the methods' settings: not at runtime


class BrokenEdit(Exception):
    """The edit is unusable (non-finite weights): the trial is marked infeasible, never scored."""


@dataclass
class MethodContext:
    adapter: Adapter
    settings: Settings
    n_layers: int
    components: list[str]  # the components the user wants edited and the model has
    directions: Tensor  # (layers + 1, hidden) refusal directions
    captures: dict[tuple[int, int], ModuleCapture] = field(default_factory=dict)  # (slot, expert) -> capture (ARA)
