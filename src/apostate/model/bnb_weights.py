"""Read back the weights of a bitsandbytes 4-bit layer, in whatever layout bitsandbytes left them.

bitsandbytes (0.49 and later) repacks a 4-bit weight in place on its first forward pass on
a CPU with AVX512-BF16: the nibbles move to a kernel-friendly layout, the double-quantized
absmax becomes a plain bfloat16 (blocks, out) table, and `quant_state` is flagged
`packing_format_for_cpu`. `dequantize_4bit(weight.data, quant_state)` then returns
garbage without any error (on the demo model every edit came out ten times too weak).
Here the repacked layout is undone on copies, so the live layer keeps its fast format.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor

from apostate.errors import ApostateError


def dequantize(weight) -> Tensor:
    """The (out, in) weight a bitsandbytes Params4bit stands for, as its layer computes with it."""
    import bitsandbytes.functional as F

    state = weight.quant_state
    if not getattr(state, "packing_format_for_cpu", False):
        return F.dequantize_4bit(weight.data, state)
    try:
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as unpack
    except ImportError:
        raise ApostateError(
            "this bitsandbytes version repacks 4-bit weights for the CPU in a layout apostate cannot read; "
            "use bitsandbytes 0.49-0.50, or a GPU"
        ) from None
    state_copy = copy.copy(state)
    state_copy.original_nested = False  # keep the absmax as it is: no lossy re-quantization
    qweight, unpacked = unpack(weight.data.clone(), state_copy)
    unpacked.absmax = state.absmax.T.reshape(-1).float()  # (blocks, out) back to block order
    unpacked.nested = False
    unpacked.dtype = torch.float32
    return F.dequantize_4bit(qweight, unpacked)
