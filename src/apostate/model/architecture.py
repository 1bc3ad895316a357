"""Find the residual writers of every decoder layer.

A residual writer is a weight whose output is added to the residual stream: attention (or
other token-mixer) out-projections, MLP down-projections, and the down-projections of MoE
experts, whether they are separate Linear modules or one stacked 3D parameter. Layers may
differ (hybrid models). A module that writes hidden-size outputs under a name we do not
know is reported, never silently skipped; a model where nothing is found is an error.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from apostate.errors import ApostateError

# fmt: off
WRITER_NAMES = {"o_proj", "out_proj", "dense", "wo", "down_proj", "fc2", "w2", "dense_4h_to_h", "output_linear", "c_proj"}
# Modules that read the residual stream or live inside a block: never writers.
READER_NAMES = {
    "q_proj", "k_proj", "v_proj", "qkv_proj", "query_key_value", "c_attn", "query", "key", "value",
    "gate_proj", "up_proj", "gate_up_proj", "w1", "w3", "fc1", "c_fc", "dense_h_to_4h", "input_linear",
    "in_proj", "in_proj_qkvz", "in_proj_ba", "x_proj", "dt_proj", "router", "gate", "shared_expert_gate",
    "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "lm_head",
}
ATTENTION_PARENTS = {"self_attn", "attn", "attention", "self_attention", "linear_attn", "conv", "mamba", "mixer", "token_mixer"}
MLP_PARENTS = {"mlp", "feed_forward", "ffn", "block_sparse_moe", "moe", "experts", "shared_expert", "shared_experts", "shared_mlp", "channel_mixer"}
MLP_LEAVES = {"down_proj", "fc2", "w2", "dense_4h_to_h", "output_linear"}
# fmt: on
LAYER_LIST_NAMES = {"layers", "h", "blocks", "layer"}


@dataclass(frozen=True)
class ResidualWriter:
    """One weight that writes into the residual stream after layer `layer`."""

    layer: int
    component: str  # "attn" or "mlp"
    path: str  # module path in the model
    parameter: str | None = None  # name of a stacked (experts, ., .) parameter; None for a Linear


@dataclass(frozen=True)
class WriterEdit:
    """A writer's edit, computed only when asked (a dense float32 delta can be large)."""

    writer: ResidualWriter
    shape: tuple[int, ...]  # the layout of the writer's parameter
    compute: Callable[[], Tensor]


@dataclass
class Architecture:
    layers_path: str
    n_layers: int
    hidden_size: int
    writers: list[ResidualWriter]
    unsupported: list[str] = field(default_factory=list)

    def components(self) -> list[str]:
        return sorted({w.component for w in self.writers})

    def count(self, layer: int, component: str) -> int:
        return sum(1 for w in self.writers if w.layer == layer and w.component == component)


def discover(model: nn.Module) -> Architecture:
    """All residual writers of a causal LM, by layer and component."""
    text_config = model.config.get_text_config()
    hidden_size = text_config.hidden_size
    layers_path, layers = _decoder_layers(model, text_config.num_hidden_layers)
    writers: list[ResidualWriter] = []
    unsupported: list[str] = []
    for index, layer in enumerate(layers):
        for name, module in layer.named_modules():
            path = f"{layers_path}.{index}.{name}" if name else f"{layers_path}.{index}"
            writers.extend(_stacked_writers(index, path, name, module, hidden_size))
            verdict = _linear_verdict(name, module, hidden_size)
            if verdict == "writer":
                writers.append(ResidualWriter(index, _component(name), path))
            elif verdict == "unsupported":
                unsupported.append(f"{path} ({type(module).__name__})")
    if not writers:
        cannot = f" (modules it cannot edit: {', '.join(unsupported[:4])})" if unsupported else ""
        raise ApostateError(
            f"found no residual writers (attention out-projections, MLP down-projections) in "
            f"{type(model).__name__}; this architecture is not supported{cannot}"
        )
    return Architecture(layers_path, len(layers), hidden_size, writers, unsupported)


def decoder_layer_list(model: nn.Module) -> nn.ModuleList | None:
    """The decoder layers where transformers keeps them (`get_decoder().layers`), or None."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    return layers if isinstance(layers, nn.ModuleList) and len(layers) else None


def _decoder_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == n_layers and name.rsplit(".", 1)[-1] in LAYER_LIST_NAMES
    ]
    if not candidates:
        raise ApostateError(f"cannot find the {n_layers} decoder layers of {type(model).__name__}")
    return min(candidates, key=lambda item: item[0].count("."))


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _component(name: str) -> str:
    parts = set(name.split("."))
    if parts & MLP_PARENTS:
        return "mlp"
    if parts & ATTENTION_PARENTS:
        return "attn"
    return "mlp" if _leaf(name) in MLP_LEAVES else "attn"


def _linear_verdict(name: str, module: nn.Module, hidden_size: int) -> str | None:
    """'writer', 'unsupported' (writes hidden-size outputs, unknown kind), or None."""
    if not name:
        return None
    leaf = _leaf(name)
    if isinstance(module, nn.Linear):
        if leaf in WRITER_NAMES and module.out_features == hidden_size:
            return "writer"
        if leaf not in WRITER_NAMES | READER_NAMES and module.out_features == hidden_size:
            return "unsupported"
        return None
    # GPT-2 style Conv1D and other weight holders with a writer's name we cannot edit.
    weight = getattr(module, "weight", None)
    if leaf in WRITER_NAMES and isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return "unsupported"
    return None


def _stacked_writers(index: int, path: str, name: str, module: nn.Module, hidden_size: int) -> list[ResidualWriter]:
    """Writers stored as one (experts, ., .) parameter, e.g. fused MoE expert down-projections."""
    found = []
    for param_name, param in module.named_parameters(recurse=False):
        if param.dim() != 3 or param_name not in MLP_LEAVES:
            continue
        out_dim = stacked_output_dim(module)
        if param.shape[out_dim] != hidden_size:
            continue
        found.append(ResidualWriter(index, "mlp", path, param_name))
    return found


def stacked_output_dim(module: nn.Module) -> int:
    """Which dim of a stacked expert parameter is the output (hidden) dimension."""
    return 2 if getattr(module, "is_transposed", False) else 1
