"""The PEFT LoRA adapter that carries every edit, and uniform access to its factors.

Each residual writer gets a LoRA slot. Whatever the module kind (Linear, bitsandbytes
4-bit Linear, stacked expert parameter), a slot reads its base weight as a float32
(experts, out, in) tensor and takes factors A (experts, rank, in) and B (experts, out, rank),
so that the edited weight is W + B @ A. Resetting zeroes every factor, which makes the
model's outputs equal the base model's exactly (x + 0 == x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from apostate.model.architecture import Architecture, ResidualWriter, WriterEdit, stacked_output_dim
from apostate.model.bnb_weights import dequantize
from apostate.model.offload import execution_device, offload_hook, read_parameter

ADAPTER = "default"


@dataclass
class AdapterSlot:
    writer: ResidualWriter
    module: nn.Module  # the PEFT LoRA layer wrapping the writer

    @property
    def stacked(self) -> bool:
        return self.writer.parameter is not None

    @property
    def rank(self) -> int:
        return self.module.r[ADAPTER]

    @property
    def shape(self) -> tuple[int, int, int]:
        """(experts, out, in) of the base weight, without reading (or dequantizing) it."""
        base = self.module.get_base_layer()
        if not self.stacked:
            return 1, base.out_features, base.in_features
        experts, first, second = getattr(base, self.writer.parameter).shape
        return (experts, second, first) if stacked_output_dim(base) == 2 else (experts, first, second)

    @property
    def parameter_shape(self) -> tuple[int, ...]:
        """The layout of the original parameter, which `delta` follows."""
        experts, out, inp = self.shape
        if not self.stacked:
            return out, inp
        return (experts, inp, out) if stacked_output_dim(self.module.get_base_layer()) == 2 else (experts, out, inp)

    def edit(self) -> WriterEdit:
        return WriterEdit(self.writer, self.parameter_shape, self.delta)

    def base_weight(self) -> Tensor:
        """The unedited weight, dequantized, as float32 (experts, out, in), row-major.

        Row-major whatever layout the CPU kernels chose for speed (a timed choice): an edit
        computed from it then has the same bits in every run, resumed or reproduced."""
        base = self.module.get_base_layer()
        if self.stacked:
            weight = getattr(base, self.writer.parameter).detach().float()
            return (weight.transpose(1, 2) if stacked_output_dim(base) == 2 else weight).contiguous()
        weight = read_parameter(base, "weight")  # offloaded: from accelerate's map
        if getattr(weight, "quant_state", None) is not None:
            weight = dequantize(weight)
        return weight.detach().float().contiguous().reshape(1, base.out_features, base.in_features)

    def write(self, a: Tensor, b: Tensor) -> None:
        """Set the factors so that the edit is B @ A; rank may be below the slot's rank."""
        n_experts, rank, _ = a.shape
        if rank > self.rank:
            raise ValueError(f"edit of rank {rank} does not fit a slot of rank {self.rank}")
        full_a = a.new_zeros(n_experts, self.rank, a.shape[2])
        full_b = b.new_zeros(n_experts, b.shape[1], self.rank)
        full_a[:, :rank] = a
        full_b[:, :, :rank] = b / self.module.scaling[ADAPTER]
        lora_a = self.module.lora_A[ADAPTER].weight
        lora_b = self.module.lora_B[ADAPTER].weight
        with torch.no_grad():
            if self.stacked:
                # PEFT's layout: A rows are expert-major, B columns are rank-major.
                lora_a.copy_(full_a.reshape(-1, full_a.shape[2]))
                lora_b.copy_(full_b.permute(1, 2, 0).reshape(full_b.shape[1], -1))
            else:
                lora_a.copy_(full_a[0])
                lora_b.copy_(full_b[0])

    def factors(self) -> tuple[Tensor, Tensor]:
        """The current (A, B), float32, shaped (experts, rank, in) and (experts, out, rank), scaling folded into B."""
        lora_a = self.module.lora_A[ADAPTER].weight.detach().float()
        lora_b = self.module.lora_B[ADAPTER].weight.detach().float() * self.module.scaling[ADAPTER]
        if self.stacked:
            n_experts = lora_a.shape[0] // self.rank
            a = lora_a.reshape(n_experts, self.rank, -1)
            b = lora_b.reshape(lora_b.shape[0], self.rank, n_experts).permute(2, 0, 1)
            return a, b
        return lora_a.unsqueeze(0), lora_b.unsqueeze(0)

    def zero(self) -> None:
        with torch.no_grad():
            self.module.lora_A[ADAPTER].weight.zero_()
            self.module.lora_B[ADAPTER].weight.zero_()

    def delta(self) -> Tensor:
        """The edit B @ A in the layout of the original parameter (float32)."""
        a, b = self.factors()
        delta = b @ a
        if not self.stacked:
            return delta[0]
        base = self.module.get_base_layer()
        return delta.transpose(1, 2) if stacked_output_dim(base) == 2 else delta


@dataclass
class Adapter:
    model: nn.Module  # the PeftModel
    slots: list[AdapterSlot]

    def reset(self) -> None:
        for slot in self.slots:
            slot.zero()

    def edited_layers(self) -> set[int]:
        """Decoder layers with a writer whose slot holds a nonzero edit."""
        return {slot.writer.layer for slot in self.slots if slot.module.lora_B[ADAPTER].weight.any()}


def attach_adapter(model: nn.Module, architecture: Architecture, rank: int) -> Adapter:
    """Wrap every residual writer in a zero LoRA slot of the given rank."""
    from peft import LoraConfig, get_peft_model

    linear = [w.path for w in architecture.writers if w.parameter is None]
    stacked = [f"{w.path}.{w.parameter}" for w in architecture.writers if w.parameter is not None]
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,  # scaling 1: B @ A is the edit itself
        lora_dropout=0.0,
        target_modules=linear or None,
        target_parameters=stacked or None,
        init_lora_weights=True,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    peft_model.eval()
    inner = peft_model.base_model.model  # the original model object, its writers now wrapped
    _wrap_missed(peft_model, inner, linear)
    slots = [AdapterSlot(writer, _lora_module(inner, writer)) for writer in architecture.writers]
    for slot in slots:
        _place_on_execution_device(slot.module)
    adapter = Adapter(peft_model, slots)
    adapter.reset()
    return adapter


def _wrap_missed(peft_model: nn.Module, inner: nn.Module, paths: list[str]) -> None:
    """Wrap Linear writers that PEFT dropped from the config.

    PEFT rewrites the targets of MoE models whose layout changed in transformers 5, mapping
    every '...down_proj' to the fused expert parameter; a shared expert's down_proj is then
    lost. Wrapping it directly keeps it, and listing it in the config keeps saved adapters whole.
    """
    from peft.tuners.lora import LoraLayer

    config = peft_model.peft_config[ADAPTER]
    for path in paths:
        if isinstance(inner.get_submodule(path), LoraLayer):
            continue
        parent_path, _, name = path.rpartition(".")
        parent = inner.get_submodule(parent_path)
        peft_model.base_model._create_and_replace(
            config, ADAPTER, getattr(parent, name), name, parent, current_key=path
        )
        config.target_modules = set(config.target_modules or ()) | {path}
        if not isinstance(inner.get_submodule(path), LoraLayer):
            raise RuntimeError(f"PEFT could not wrap {path}")


def _place_on_execution_device(module: nn.Module) -> None:
    """A slot around an offloaded writer: PEFT put its factors on meta, beside the weight; they
    belong where the writer computes."""
    base = module.get_base_layer()
    if offload_hook(base) is None:
        return
    device = execution_device(base, torch.device("cpu"))
    for factors in (module.lora_A[ADAPTER], module.lora_B[ADAPTER]):
        weight = factors.weight
        if weight.device != device:
            zeros = torch.zeros(weight.shape, dtype=weight.dtype, device=device)
            factors.weight = nn.Parameter(zeros, requires_grad=weight.requires_grad)


def _lora_module(model: nn.Module, writer: ResidualWriter) -> nn.Module:
    """The LoRA layer wrapping a writer (ParamWrappers nest, so look for the one with our parameter)."""
    module = model.get_submodule(writer.path)
    if writer.parameter is None:
        return module
    while getattr(module, "parameter_name", None) not in (None, writer.parameter):
        module = module.base_layer
    if getattr(module, "parameter_name", None) != writer.parameter:
        raise RuntimeError(f"PEFT did not wrap {writer.path}.{writer.parameter}")
    return module
