"""What the timed kernel choices (kernel_timing) do to one loaded model, owned by one object.

`CpuKernels.apply(model)` changes a float32 model on the CPU in two ways that leave every
product the same (up to the order of its sums):
- weights stored column-major (same shape, strides (1, out)) where that multiplies faster;
- Linear layers whose `forward` is replaced, as an instance attribute, by one that runs on
  oneDNN for the row ranges where oneDNN is faster (`restore` deletes those attributes again,
  so the class's own forward applies).
It also makes the model's greedy head (greedy_head) once, where the bfloat16 screen pays.
Everything it timed or made is kept on the object, none in the module.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from apostate.decoding import kernel_timing
from apostate.decoding.greedy_head import GreedyHead
from apostate.decoding.kernel_timing import ROW_RANGES, KernelTimer
from apostate.model.checkpoint_pages import checkpoint_mappings, drop_pages


class CpuKernels:
    """The fastest float32 CPU kernels for a model, as timed on this machine."""

    def __init__(self, timer: KernelTimer | None = None):
        self.timer = timer or KernelTimer()
        self.routed: list[torch.nn.Linear] = []  # layers whose forward `apply` replaced
        self._heads: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # projection -> GreedyHead

    def apply(self, model) -> str:
        """Choose each weight's layout and each Linear layer's library; what was chosen, for the console."""
        transposed = column_major_cpu_weights(model, self.timer.column_major_pays)
        self.routed += route_linears(model, self.timer.onednn_pays)
        self.greedy_head(model)  # timed now, so that every timed choice is told together
        if not transposed and not self.routed and not self.timer.measured:
            return ""
        lines = [
            f"* Timed on this CPU: {transposed} weights column-major, "
            f"{len(self.routed)} Linear layers on oneDNN for some row counts"
        ]
        return "\n".join(lines + [f"  * {line}" for line in self.timer.report()])

    def restore(self) -> None:
        """Give every routed Linear layer its own forward back (weight layouts stay: same values)."""
        for module in self.routed:
            module.__dict__.pop("forward", None)
        self.routed.clear()

    def greedy_head(self, model) -> GreedyHead | None:
        """The model's greedy head, made once; None where screening does not apply or would not pay."""
        projection = model.get_output_embeddings()
        if not GreedyHead.applies_to(projection):
            return None
        if projection not in self._heads:
            pays = self.timer.bfloat16_screen_pays(projection.weight)
            self._heads[projection] = GreedyHead(projection) if pays else None
        return self._heads[projection]


def float32_cpu_linears(model) -> list[torch.nn.Linear]:
    """The Linear layers with a 2-D float32 weight on the CPU: the ones the timed kernels apply to."""
    found = []
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, torch.nn.Linear) or not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            continue
        if weight.dtype == torch.float32 and weight.device.type == "cpu":
            found.append(module)
    return found


def route_linears(model, pays: Callable[[torch.Tensor], tuple[bool, ...]]) -> list[torch.nn.Linear]:
    """Let float32 CPU Linear layers run on oneDNN for the row ranges where `pays` says it is faster.

    On a 2-core AMD machine with AVX2, oneDNN took 3.4 ms instead of 5.6 for the demo model's
    gate projection at 16 rows, and 11 ms instead of 28 for 4,096 rows of its output
    projection, while MKL was faster for prompt batches. The weight stays the module's own
    (read at every call, so in-place edits apply); gradients always take `F.linear`.
    Returns the routed layers.
    """
    routed = []
    for module in float32_cpu_linears(model):
        choices = pays(module.weight)
        if any(choices):
            module.forward = partial(_routed_forward, module, choices)
            routed.append(module)
    return routed


def _routed_forward(module: torch.nn.Linear, choices: tuple[bool, ...], x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    chosen = next(choice for (most, _), choice in zip(ROW_RANGES, choices, strict=True) if most is None or rows <= most)
    if (
        not chosen
        or x.dtype != torch.float32
        or (torch.is_grad_enabled() and (x.requires_grad or module.weight.requires_grad))
    ):
        return F.linear(x, module.weight, module.bias)
    flat = x.reshape(-1, x.shape[-1])
    return kernel_timing.onednn_linear(flat, module.weight, module.bias).reshape(*x.shape[:-1], module.weight.shape[0])


def column_major_cpu_weights(model, pays: Callable[[torch.Tensor], bool]) -> int:
    """Store float32 Linear weights on the CPU transposed in memory (same shape, strides (1, out)),
    for the weight shapes where `pays` (timed on this machine, see kernel_timing).

    Then `F.linear` hands the GEMM an (in, out) row-major matrix, which some CPUs' float32
    kernels read faster when few rows go through: a 16-row decoding step of the demo model
    took 0.19 s instead of 0.25 s on an Intel machine with AVX-512, while an AMD machine with
    AVX2 ran the down projection 1.4x slower that way. The products are the same up to
    rounding (another kernel may sum in another order: 1e-7 on a 64-wide test model).
    bfloat16 weights are never changed. Returns how many weights were changed.
    """
    changed = 0
    mappings = checkpoint_mappings()  # the old weights' pages go as soon as their copies exist
    with torch.no_grad():
        for module in float32_cpu_linears(model):
            if module.weight.is_contiguous() and pays(module.weight):
                module.weight.data = _column_major_copy(module.weight.data, mappings)
                changed += 1
    return changed


def _column_major_copy(tensor: torch.Tensor, mappings, rows_per_chunk: int = 4096) -> torch.Tensor:
    """A column-major copy, made a block of rows at a time; the source pages of each block are
    dropped once copied, so that a mapped weight is never resident twice (checkpoint_pages)."""
    copy = torch.empty_strided(tensor.shape, (1, tensor.shape[0]), dtype=tensor.dtype)
    row_bytes = tensor.shape[1] * tensor.element_size()
    for start in range(0, tensor.shape[0], rows_per_chunk):
        block = tensor[start : start + rows_per_chunk]
        copy[start : start + rows_per_chunk].copy_(block)
        drop_pages(block.data_ptr(), block.data_ptr() + block.shape[0] * row_bytes, mappings)
    return copy
