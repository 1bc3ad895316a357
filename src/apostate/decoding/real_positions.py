"""Run a decoding pass's Linear layers on its real tokens only, not on the padding after short drafts.

A decoding pass carries every row's last token and draft, padded to the longest draft
(speculative.py). Attention needs that padded layout, but a Linear layer works on each
position alone, so its input is gathered to the real positions and its output scattered
back, with zeros at the padding. Padding slots are masked out of every later attention and
their outputs are never read, so what the real positions compute does not change.

In the demo model's side-by-side trials 29-36% of the decoding slots were padding, and the
Linear layers are ~90% of a pass's compute on a CPU: a pass of 16 rows with 84 real tokens
in 272 slots took 1.0 s instead of 2.0 s. (Prompt passes, sorted by length, have ~10%
padding; there the gathers cost what they saved, so they run padded.) An MLP block is
gathered once as a whole (its activations are as wide as its inner size); Linear layers
outside it, one by one.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from apostate.model.architecture import MLP_PARENTS, decoder_layer_list

ADAPTER_PARTS = {"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"}  # PEFT's factors: too small to pay


def position_wise_modules(model) -> list[nn.Module]:
    """What works on each position alone in every decoder layer: its MLP block, and the Linear layers outside it.

    Empty for a model whose decoder layers are not at `get_decoder().layers`: it then runs padded.
    """
    modules: list[nn.Module] = []
    for layer in decoder_layer_list(model) or []:
        mlp = next((child for name, child in layer.named_children() if name in MLP_PARENTS), None)
        inside_mlp = set(mlp.modules()) if mlp is not None else set()
        modules += [mlp] if mlp is not None else []
        modules += [
            module
            for name, module in layer.named_modules()
            if isinstance(module, nn.Linear)
            and module not in inside_mlp
            and not ADAPTER_PARTS.intersection(name.split("."))
        ]
    return modules


@contextmanager
def on_real_positions(modules: list[nn.Module], real: torch.Tensor):
    """Within the context, `modules` given a (rows, width, features) input compute only where `real` is True.

    `real`: (rows, width) booleans. Inputs of any other shape (a router's flattened tokens,
    an expert's share of them) pass through untouched. Where a module returns a tuple (an MoE
    block with its router's logits), only its first element is scattered back.
    """
    if bool(real.all()):
        yield
        return
    shape = tuple(real.shape)
    kept = real.reshape(-1).nonzero().squeeze(1)
    gathered: dict[nn.Module, torch.Tensor] = {}  # this call's gathered input, per layer

    def gather(module, args):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or tuple(x.shape[:2]) != shape:
            return None
        inner = x.reshape(-1, x.shape[-1]).index_select(0, kept).unsqueeze(0)
        gathered[module] = inner
        return (inner, *args[1:])

    def scatter(module, args, output):
        if not args or gathered.pop(module, None) is not args[0]:
            return None
        if isinstance(output, tuple):
            return (padded(output[0]), *output[1:])
        return padded(output)

    def padded(output: torch.Tensor) -> torch.Tensor:
        full = output.new_zeros(shape[0] * shape[1], output.shape[-1])
        full.index_copy_(0, kept, output.reshape(-1, output.shape[-1]))
        return full.reshape(*shape, output.shape[-1])

    handles = [hook for module in modules for hook in _hooks(module, gather, scatter)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _hooks(module: nn.Module, gather, scatter):
    return module.register_forward_pre_hook(gather), module.register_forward_hook(scatter)
