"""Weights that accelerate keeps elsewhere between forward passes (device_map "auto" with a
`max_memory` too small for the model: CPU memory behind a GPU, or disk).

Such a module's parameters are on the meta device; its AlignDevicesHook moves them from its
`weights_map` to the execution device for each forward and drops them after. Reading a weight
(to compute an edit) goes through that map, and a LoRA slot on such a module lives on its
execution device (PEFT would put it on meta, beside the weight it wraps).
"""

from __future__ import annotations

import torch
from torch import nn


def offload_hook(module: nn.Module):
    """accelerate's hook of `module` if its weights are offloaded, else None."""
    hook = getattr(module, "_hf_hook", None)
    for inner in getattr(hook, "hooks", None) or [hook]:  # a SequentialHook holds several
        if getattr(inner, "offload", False):
            return inner
    return None


def read_parameter(module: nn.Module, name: str) -> torch.Tensor:
    """The module's parameter `name`, from its offload map when it is on the meta device."""
    value = getattr(module, name)
    if value.device.type != "meta":
        return value
    hook = offload_hook(module)
    if hook is None:
        raise RuntimeError(f"{type(module).__name__}.{name} is on the meta device and no accelerate hook holds it")
    return hook.weights_map[name]


def execution_device(module: nn.Module, fallback: torch.device) -> torch.device:
    """Where an offloaded module computes; `fallback` for one that is not offloaded."""
    hook = offload_hook(module)
    device = getattr(hook, "execution_device", None)
    return torch.device(device) if device is not None else fallback


def first_real_device(model: nn.Module) -> torch.device:
    """Where the model takes its inputs: its input embeddings' device, or their execution device
    when offloaded."""
    embeddings = model.get_input_embeddings()
    device = embeddings.weight.device
    return execution_device(embeddings, device) if device.type == "meta" else device
