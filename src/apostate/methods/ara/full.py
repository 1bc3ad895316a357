"""Arbitrary-Rank Ablation of full weights.

Each selected residual writer W gets an edit of any rank, W' = W + ΔW, fitted by LBFGS so
that its last-position outputs for harmless prompts stay put while those for harmful prompts
move toward the harmless outputs and away from their own (objective: objective.py).
ΔW = C Q, where Q (k × in) spans the captured inputs: only C (out × k) is optimized.

The edit is written into the model's weights in place; the originals are kept in memory
and copied back on reset, so trials never reload the model. Full precision only: on a
4-bit model use `ara-lora`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from apostate.errors import ApostateError
from apostate.methods.ara.objective import fit
from apostate.methods.ara.settings import AraSettings
from apostate.methods.ara.shared import AraMethodBase, AraParameters
from apostate.methods.context import MethodContext
from apostate.model.adapter import AdapterSlot
from apostate.model.architecture import WriterEdit, stacked_output_dim


class AraMethod(AraMethodBase):
    """Edits written into the weights in place; reset and edited_layers add those weights to
    the adapter's (AdapterEdits), deltas are the in-place edits alone."""

    name = "ara"
    edits_in_adapter = False  # full-rank edits live in the weights; only a merged export can hold them

    def __init__(self, context: MethodContext):
        if context.quantized:
            raise ApostateError("method 'ara' edits full-precision weights; on a quantized model use method 'ara-lora'")
        super().__init__(context)
        self.originals: dict[int, Tensor] = {}  # slot index -> untouched parameter (model dtype)
        self.edits: dict[tuple[int, int], Tensor] = {}  # (slot, expert) -> ΔW (out, in), float32, CPU

    @staticmethod
    def adapter_rank(settings: AraSettings) -> int:
        return 1  # the adapter stays zero; edits go into the weights

    def reset(self) -> None:
        super().reset()  # the adapter (zero all along, reset all the same)
        with torch.no_grad():
            for index, original in self.originals.items():
                self._parameter(index).copy_(original)
        self.edits.clear()

    def apply(self, parameters: AraParameters) -> None:
        for index, expert, slot, capture in self.selected(parameters):
            coefficients = torch.zeros(capture.harmful_outputs.shape[1], capture.basis.shape[0])
            fit(
                self.objective(capture, parameters),
                [coefficients],
                lambda coords, c=coefficients: coords @ c.T,
                self.settings.lbfgs_steps,
            )
            self.originals.setdefault(index, self._parameter(index).detach().clone())
            original = self._oriented(self.originals[index], slot, expert)
            factor = self.cap(coefficients.norm(), capture.weight_norm)
            delta = factor * coefficients @ capture.basis
            with torch.no_grad():
                target = self._oriented(self._parameter(index), slot, expert)
                target.copy_((original.float() + delta.to(target.device)).to(target.dtype))
            self.edits[(index, expert)] = delta

    def deltas(self) -> Iterator[WriterEdit]:
        """Per edited writer, ΔW in the layout of its parameter (all experts of a stacked one)."""
        for index in sorted({index for index, _ in self.edits}):
            shape = tuple(self._parameter(index).shape)
            yield WriterEdit(self.adapter.slots[index].writer, shape, lambda index=index: self._delta(index))

    def edited_layers(self) -> set[int]:
        return {self.adapter.slots[index].writer.layer for index, _ in self.edits} | super().edited_layers()

    def _delta(self, index: int) -> Tensor:
        slot = self.adapter.slots[index]
        delta = torch.zeros(self._parameter(index).shape, dtype=torch.float32)
        for (edited, expert), expert_delta in self.edits.items():
            if edited == index:
                self._oriented(delta, slot, expert).copy_(expert_delta)
        return delta

    def _parameter(self, index: int) -> Tensor:
        slot = self.adapter.slots[index]
        return getattr(slot.module.get_base_layer(), slot.writer.parameter or "weight")

    @staticmethod
    def _oriented(parameter: Tensor, slot: AdapterSlot, expert: int) -> Tensor:
        """A view of one expert's (out, in) weight inside a Linear weight or a stacked parameter."""
        if not slot.stacked:
            return parameter
        view = parameter[expert]
        return view.T if stacked_output_dim(slot.module.get_base_layer()) == 2 else view
