"""Arbitrary-Rank Ablation optimized as LoRA factors ("ARA, but it's LoRA").

The same objective as `ara` (see objective.py), but the edit is ΔW = B A of a fixed rank r
and LBFGS optimizes A and B directly. A = A' Q with Q (k × in) spanning the captured inputs,
so the edit never touches input directions the fit has not seen. A' starts from a fixed
random draw per module (the same in every trial, so results do not depend on trial order),
B from zero. The base weight is only read (dequantized on a 4-bit model), so this form runs
on bitsandbytes 4-bit models; the scored model is the quantized base plus the adapter, and
export merges the same factors into full-precision weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

from apostate.methods.ara.objective import fit
from apostate.methods.ara.settings import AraSettings
from apostate.methods.ara.shared import AraMethodBase, AraParameters


class AraLoraMethod(AraMethodBase):
    """The edit lives in the adapter alone: reset, deltas and edited layers are AdapterEdits'."""

    name = "ara-lora"
    edits_in_adapter = True

    @staticmethod
    def adapter_rank(settings: AraSettings) -> int:
        return settings.lora_rank

    def apply(self, parameters: AraParameters) -> None:
        rank = self.settings.lora_rank
        factors: dict[int, tuple[Tensor, Tensor]] = {}  # slot index -> (A, B) over all its experts
        for index, expert, slot, capture in self.selected(parameters):
            k = capture.basis.shape[0]
            # Linear writers (expert 0) keep seed = slot index, as in studies run before experts were fitted.
            generator = torch.Generator().manual_seed(index + 1_000_003 * expert)
            a = torch.randn(rank, k, generator=generator) / k**0.5
            b = torch.zeros(capture.harmful_outputs.shape[1], rank)
            fit(
                self.objective(capture, parameters),
                [a, b],
                lambda coords, a=a, b=b: coords @ a.T @ b.T,
                self.settings.lbfgs_steps,
            )
            if index not in factors:
                experts, out_features, in_features = slot.shape
                factors[index] = (torch.zeros(experts, rank, in_features), torch.zeros(experts, out_features, rank))
            slot_a, slot_b = factors[index]
            slot_a[expert] = a @ capture.basis
            slot_b[expert] = self.cap((b @ a).norm(), capture.weight_norm) * b
        for index, (a, b) in factors.items():
            self.adapter.slots[index].write(a, b)
