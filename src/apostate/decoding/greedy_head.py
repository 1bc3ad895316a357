"""Greedy next tokens without a float32 pass over the whole vocabulary: screen in bfloat16, decide in float32.

Greedy decoding needs only the argmax of the logits, yet the output projection (vocabulary x
hidden) is read whole on every decoding pass: a quarter of the demo model's weights. A
bfloat16 copy gives every logit to within a bound E per row (rounding of the inputs to
bfloat16, float32 accumulation as in Higham's dot-product analysis, rounding of the result):

    |logit_v - screened_v| <= E = N (u |h| + (1 + u)(|h - bf16(h)| + g |bf16(h)|)) + u' max_v |screened_v|

with N the largest row norm of the projection, u = 2^-8 (bfloat16), g = K 2^-24 / (1 - K 2^-24)
for K = hidden size, u' = u / (1 - u). Only tokens screened within 2E of the best can be the
argmax; those few are computed in float32 and the largest wins. On the demo model a row had
1.6 candidates on average (at most 22), and 80 rows took 30 ms instead of 120 ms on an Intel CPU
with AVX-512 and AMX. Whether the screen pays is timed on the machine (kernel_timing, cpu_kernels): on CPUs
without bfloat16 instructions it is slower than the float32 product, and is not used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BF16_ROUNDOFF = 2.0**-8
MAX_CANDIDATES = 4096  # beyond this many, the plain float32 projection is as cheap


class GreedyHead:
    """The argmax of `projection(hidden)`, for a bias-free float32 Linear projection."""

    def __init__(self, projection: torch.nn.Linear):
        weight = projection.weight
        self.weight = weight
        self.screen = weight.detach().to(torch.bfloat16)
        self.largest_row_norm = float(weight.detach().norm(dim=1).max())
        accumulation = weight.shape[1] * 2.0**-24
        self.accumulation = accumulation / (1 - accumulation)

    @staticmethod
    def applies_to(projection) -> bool:
        """Whether screening can stand in for this output projection: a bias-free float32 Linear on the CPU
        (bfloat16 models gain nothing; accelerators run float32 fast enough). Whether it also pays on this
        CPU is timed (CpuKernels.greedy_head)."""
        weight = getattr(projection, "weight", None)
        if type(projection) is not torch.nn.Linear or projection.bias is not None or weight is None:
            return False
        return weight.dtype == torch.float32 and weight.device.type == "cpu"

    @torch.inference_mode()
    def tokens(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., hidden) float32 final hidden states -> (...) greedy token ids."""
        shape = hidden.shape[:-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        rounded = hidden.to(torch.bfloat16)
        screened = F.linear(rounded, self.screen)  # bfloat16, never widened whole
        lowest, best = (values.float() for values in torch.aminmax(screened, dim=1))
        u = BF16_ROUNDOFF
        rounded_norm = rounded.float().norm(dim=1)
        bound = self.largest_row_norm * (
            u * hidden.norm(dim=1)
            + (1 + u) * ((hidden - rounded.float()).norm(dim=1) + self.accumulation * rounded_norm)
        ) + u / (1 - u) * torch.maximum(best.abs(), lowest.abs())
        threshold = best - 2 * bound
        # Compared in bfloat16 against a threshold rounded down, never up: at most a few more candidates.
        threshold = (threshold - threshold.abs() * 2 * u).to(torch.bfloat16)
        candidates = screened >= threshold.unsqueeze(1)
        rows, columns = candidates.nonzero(as_tuple=True)
        vocabulary = torch.unique(columns)
        if not torch.isfinite(bound).all() or len(vocabulary) > MAX_CANDIDATES:
            return F.linear(hidden, self.weight).argmax(-1).reshape(shape)
        exact = hidden @ self.weight[vocabulary].T  # (rows, candidates)
        allowed = candidates[:, vocabulary]
        exact = exact.masked_fill(~allowed, float("-inf"))
        return vocabulary[exact.argmax(1)].reshape(shape)
