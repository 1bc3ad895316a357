"""Ablation methods, registered by name. Each one samples a trial's parameters and writes its
edit into the model (through the LoRA adapter, or in place with an in-memory copy to reset
from); the trial loop, scoring, study, Pareto selection and export are shared.

| name | module |
| --- | --- |
| `directional` | `directional/method.py` |
| `ara` | `ara/full.py` |
| `ara-lora` | `ara/lora.py` |

The registry imports a method's module only when it is used, so that the settings (which
nest each method's own settings model) load without torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import import_module
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..model.architecture import WriterEdit
    from ..settings import Settings
    from .context import MethodContext

# name -> (module, class)
METHODS: dict[str, tuple[str, str]] = {
    "directional": (".directional.method", "DirectionalMethod"),
    "ara": (".ara.full", "AraMethod"),
    "ara-lora": (".ara.lora", "AraLoraMethod"),
}


class Method(Protocol):
    """What the session and the trial loop need of a method."""

    name: str
    needs_captures: bool  # fitted to captured module inputs and outputs (see ara/captures.py)
    edits_in_adapter: bool  # the LoRA adapter alone holds the edit (so it can be saved on its own)

    def __init__(self, context: MethodContext) -> None: ...

    @staticmethod
    def adapter_rank(settings: Settings) -> int:
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


def method_class(name: str) -> type[Method]:
    """The method registered as `name` (settings validate the name, so it is always known)."""
    module, cls = METHODS[name]
    return getattr(import_module(module, __name__), cls)


__all__ = ["METHODS", "Method", "method_class"]
