"""What each residual writer reads and writes at the last prompt position, for the harmless and
harmful direction prompts: the data Arbitrary-Rank Ablation fits its edits to.

Captured once per run with forward hooks and kept on the CPU. To keep the fit small, each
module's inputs are stored as coordinates in an orthonormal basis of the inputs' own span
(top singular directions): an edit that only acts inside that span changes every captured
output exactly as a full-width edit would, and leaves inputs never seen alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .adapter import Adapter, AdapterSlot
from .batching import batches
from .progress import track


@dataclass
class ModuleCapture:
    """One writer's captured activations (float32, CPU)."""

    basis: Tensor  # (k, in): orthonormal rows spanning the captured inputs
    harmless_coords: Tensor  # (n_harmless, k): inputs in that basis
    harmful_coords: Tensor  # (n_harmful, k)
    harmless_outputs: Tensor  # (n_harmless, out): the base weight's outputs (bias left out: it cancels)
    harmful_outputs: Tensor  # (n_harmful, out)


def capture_slots(adapter: Adapter) -> tuple[list[AdapterSlot], list[str]]:
    """Slots ARA can fit (Linear writers) and a description of the ones it cannot."""
    fit = [slot for slot in adapter.slots if not slot.stacked]
    skipped = [f"{slot.writer.path}.{slot.writer.parameter}" for slot in adapter.slots if slot.stacked]
    return fit, skipped


@torch.inference_mode()
def capture_writer_inputs(
    model, tokenizer, slots: list[AdapterSlot], texts: list[str], batch_size: int, device, label: str
) -> list[Tensor]:
    """Per slot, the (len(texts), in) inputs at the last prompt position (float32, CPU)."""
    rows: list[list[Tensor]] = [[] for _ in slots]
    order: list[int] = []

    def hook_for(index: int):
        def hook(module, args, output):
            # A copy: a slice would keep the whole batch's activations alive.
            rows[index].append(args[0][:, -1, :].to("cpu", torch.float32, copy=True))

        return hook

    handles = [slot.module.get_base_layer().register_forward_hook(hook_for(i)) for i, slot in enumerate(slots)]
    try:
        with track(label, len(texts)) as advance:
            for indices, inputs in batches(tokenizer, texts, batch_size, device):
                model(**inputs, use_cache=False, logits_to_keep=1)
                order.extend(indices)
                advance(len(indices))
    finally:
        for handle in handles:
            handle.remove()
    inverse = torch.argsort(torch.tensor(order))  # back to the order of `texts`
    return [torch.cat(parts)[inverse] for parts in rows]


def build_captures(
    slots: list[AdapterSlot], harmless_inputs: list[Tensor], harmful_inputs: list[Tensor], basis_rank: int
) -> list[ModuleCapture]:
    captures = []
    for slot, harmless, harmful in zip(slots, harmless_inputs, harmful_inputs, strict=True):
        weight = slot.base_weight()[0]  # (out, in), dequantized
        basis = input_basis(torch.cat([harmless, harmful]), basis_rank)
        captures.append(
            ModuleCapture(
                basis=basis,
                harmless_coords=harmless @ basis.T,
                harmful_coords=harmful @ basis.T,
                harmless_outputs=harmless @ weight.T,
                harmful_outputs=harmful @ weight.T,
            )
        )
    return captures


def input_basis(inputs: Tensor, max_rank: int) -> Tensor:
    """Orthonormal (k, in) rows spanning `inputs` (top singular directions, numerically nonzero)."""
    _, singular_values, right = torch.linalg.svd(inputs.double(), full_matrices=False)
    keep = int((singular_values > singular_values[0] * 1e-6).sum().clamp(max=max_rank))
    return right[:keep].float()
