"""What a method whose edit lives in the LoRA adapter gets for free: the reset, the edit per
writer and the decoder layers it changes, all read off the adapter's slots.

`directional` and `ara-lora` write only into the adapter and use these as they are; the
full-weight `ara` writes into the weights in place and extends `reset` and `edited_layers`
with those weights (its adapter stays zero, but is reset all the same).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apostate.model.adapter import Adapter
    from apostate.model.architecture import WriterEdit


class AdapterEdits:
    """reset, deltas and edited_layers of the Method protocol, for an edit held by `self.adapter`."""

    adapter: Adapter

    def reset(self) -> None:
        """Give back the base model exactly: every adapter slot back to zero."""
        self.adapter.reset()

    def deltas(self) -> Iterator[WriterEdit]:
        """Each adapter slot's edit (B @ A), in the layout of its writer's parameter."""
        for slot in self.adapter.slots:
            yield slot.edit()

    def edited_layers(self) -> set[int]:
        """The decoder layers whose adapter slots hold a nonzero edit."""
        return self.adapter.edited_layers()
