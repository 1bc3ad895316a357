"""Per-expert down-projection inputs of fused MoE experts, at the last prompt positions.

transformers 5 stores a layer's experts as stacked parameters (`gate_up_proj`, `down_proj`)
in one module called as experts(hidden_states, top_k_index, top_k_weights) on flattened
tokens. A forward hook on that module recomputes, for the last positions of each prompt and
each expert the router picked for it, the expert's down-projection input act(gate) · up.
Experts that no captured token was routed to are simply absent. Modules of another shape
(biases, custom activations) are reported as not capturable, never guessed at.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from apostate.model.adapter import AdapterSlot


def expert_module(slot: AdapterSlot) -> nn.Module | None:
    """The fused experts module behind a stacked slot, if its forward is the standard one."""
    if not slot.stacked or slot.writer.parameter != "down_proj":
        return None
    module = slot.module.get_base_layer()
    standard = (
        isinstance(getattr(module, "gate_up_proj", None), torch.Tensor)
        and callable(getattr(module, "act_fn", None))
        and not any(hasattr(module, name) for name in ("gate_up_proj_bias", "down_proj_bias", "alpha", "limit"))
    )
    return module if standard else None


def down_inputs(module: nn.Module, states: Tensor, experts: Tensor) -> tuple[Tensor, Tensor]:
    """act(gate) · up for each (token, chosen expert): (n·k,) expert ids and (n·k, intermediate) inputs."""
    gate_up = module.gate_up_proj
    if getattr(module, "is_transposed", False):
        gate_up = gate_up.transpose(1, 2)  # to (experts, 2 · intermediate, hidden)
    flat_experts = experts.reshape(-1)
    repeated = states.repeat_interleave(experts.shape[1], dim=0)
    projected = torch.einsum("nh,nph->np", repeated.float(), gate_up[flat_experts].float())
    gate, up = projected.chunk(2, dim=-1)
    return flat_experts, module.act_fn(gate) * up


class ExpertRecorder:
    """Forward hook collecting (prompt index, expert, down input) at each prompt's last `positions` positions."""

    def __init__(self, module: nn.Module, keep_on="cpu", positions: int = 1):
        self.module = module
        self.keep_on = keep_on
        self.positions = positions
        self.rows: list[tuple[Tensor, Tensor, Tensor]] = []  # prompt indices, experts, inputs
        self.batch: tuple[list[int], int, int] | None = None  # prompt indices, batch size, sequence length

    def __call__(self, module, args, output) -> None:
        hidden_states, top_k_index = args[0], args[1]
        indices, batch, length = self.batch
        ends = torch.arange(batch, device=hidden_states.device) * length + length
        offsets = torch.arange(self.positions, 0, -1, device=hidden_states.device)
        last = (ends[:, None] - offsets).reshape(-1)  # each prompt's last positions, first to last
        chosen = top_k_index[last]  # (batch · positions, k)
        experts, inputs = down_inputs(module, hidden_states[last], chosen)
        prompts = torch.tensor(indices).repeat_interleave(self.positions * chosen.shape[1])
        self.rows.append((prompts, experts.cpu(), inputs.to(self.keep_on, copy=True)))

    def per_expert(self) -> dict[int, Tensor]:
        """Expert -> (prompts routed to it, intermediate) inputs, in prompt order."""
        prompts = torch.cat([row[0] for row in self.rows])
        experts = torch.cat([row[1] for row in self.rows])
        inputs = torch.cat([row[2] for row in self.rows])
        result = {}
        for expert in experts.unique().tolist():
            mask = experts == expert
            order = torch.argsort(prompts[mask], stable=True)  # a prompt's positions stay in order
            result[expert] = inputs[mask][order]
        return result
