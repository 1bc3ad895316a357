"""Arbitrary-Rank Ablation of full weights.

Each selected residual writer W gets an edit of any rank, W' = W + ΔW, fitted by LBFGS so
that its last-position outputs for harmless prompts stay put while those for harmful prompts
move toward the harmless outputs and away from their own (objective: ara_objective).
ΔW = C Q, where Q (k × in) spans the captured inputs: only C (out × k) is optimized.

The edit is written into the model's weights in place; the originals are kept in memory
and copied back on reset, so trials never reload the model. Full precision only: on a
4-bit model use `ara-lora`.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from ..architecture import ResidualWriter
from ..errors import ApostateError
from .ara_base import AraMethodBase, AraParameters
from .ara_objective import fit
from .context import MethodContext


class AraMethod(AraMethodBase):
    name = "ara"

    def __init__(self, context: MethodContext):
        if context.settings.quantization != "none":
            raise ApostateError("method 'ara' edits full-precision weights; on a quantized model use method 'ara-lora'")
        super().__init__(context)
        self.originals: dict[int, Tensor] = {}  # slot index -> untouched weight (model dtype)
        self.edits: dict[int, Tensor] = {}  # slot index -> ΔW (float32, CPU)

    @staticmethod
    def adapter_rank(settings) -> int:
        return 1  # the adapter stays zero; edits go into the weights

    def reset(self) -> None:
        self.adapter.reset()
        with torch.no_grad():
            for index, original in self.originals.items():
                self._weight(index).copy_(original)
        self.edits.clear()

    def apply(self, parameters: AraParameters) -> None:
        for index, slot, capture in self.selected(parameters):
            coefficients = torch.zeros(capture.harmful_outputs.shape[1], capture.basis.shape[0])
            fit(
                self.objective(capture, parameters),
                [coefficients],
                lambda coords, c=coefficients: coords @ c.T,
                self.settings.ara.lbfgs_steps,
            )
            weight = self._weight(index)
            factor = self.cap(coefficients.norm(), slot.base_weight().norm())
            delta = factor * coefficients @ capture.basis
            self.originals.setdefault(index, weight.detach().clone())
            with torch.no_grad():
                weight.copy_((self.originals[index].float() + delta.to(weight.device)).to(weight.dtype))
            self.edits[index] = delta

    def deltas(self) -> Iterator[tuple[ResidualWriter, Tensor]]:
        for index, delta in self.edits.items():
            yield self.adapter.slots[index].writer, delta

    def _weight(self, index: int) -> Tensor:
        return self.adapter.slots[index].module.get_base_layer().weight
