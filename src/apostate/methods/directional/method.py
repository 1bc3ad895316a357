"""Directional ablation ("abliteration"), Arditi et al. 2024, arXiv:2406.11717.

For a residual writer W (out × in) and a unit refusal direction v (out):

    W' = W − w · v (vᵀ W)

stored as a LoRA edit B @ A with B = −w·v, A = vᵀW (rank 1); the out × out projector
v vᵀ is never formed. With w = 1 nothing W writes has a component along v any more.

Row normalization (Lai 2025, "norm-preserving biprojected abliteration"). A "row" is
what one input unit writes into the residual stream (a column of the torch weight, a row
in the x·W convention of the write-ups), with norm n_j:

* none: the plain projection above. Rows lose their component along v and shrink.
* full: rows keep their norm: w'_j = n_j · normalize(w_j − w·(vᵀw_j)·v). Exactly that is a
  full-rank change, so it is approximated within `full_normalization_rank` r: the
  projection (rank 1) plus exact norm restoration of the r − 1 rows the projection shrinks
  most (one rank each). The projection stays exact; the other rows shrink by less than
  those r − 1, which in practice is a fraction of a percent.
* pre: the edit is computed on weights whose output rows are unit-normalized and mapped
  back with the row norms: ΔW = −w · diag(n_out) v (vᵀ diag(n_out)⁻¹ W). This reads
  the direction relative to each output coordinate's scale (rank 1; the convention of
  earlier tools, kept for comparison).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from apostate.directions.refusal import direction_at
from apostate.methods.adapter_edits import AdapterEdits
from apostate.methods.context import MethodContext
from apostate.methods.directional.settings import DirectionalSettings, SearchSpace
from apostate.methods.directional.weight_kernel import WeightKernel
from apostate.model.adapter import Adapter


@dataclass(frozen=True)
class DirectionalParameters:
    """One trial's parameters: which direction, and how strongly per layer and component."""

    direction_index: float | None  # None: every layer uses its own direction
    kernels: dict[str, WeightKernel]

    def as_dict(self) -> dict:
        return {
            "direction_index": "per layer" if self.direction_index is None else self.direction_index,
            "kernels": {component: kernel.as_dict() for component, kernel in self.kernels.items()},
        }


def suggest(trial, space: SearchSpace, n_layers: int, components: list[str]) -> DirectionalParameters:
    """Sample parameters; every parameter is always sampled, as multivariate TPE needs a fixed space."""
    last = n_layers - 1
    scopes = ["global", "per layer"] if space.per_layer_directions else ["global"]
    scope = trial.suggest_categorical("direction_scope", scopes)
    low, high = space.direction_index
    index = trial.suggest_float("direction_index", low * last, high * last)
    kernels = {}
    for component in components:
        max_weight = trial.suggest_float(f"{component}.max_weight", *space.max_weight)
        position = trial.suggest_float(
            f"{component}.max_weight_position", space.max_weight_position[0] * last, space.max_weight_position[1] * last
        )
        # Relative to max_weight, so the range does not depend on another parameter.
        min_fraction = trial.suggest_float(f"{component}.min_weight", *space.min_weight)
        distance = trial.suggest_float(
            f"{component}.min_weight_distance",
            max(space.min_weight_distance[0] * last, 0.5),
            max(space.min_weight_distance[1] * last, 0.5),
        )
        kernels[component] = WeightKernel(max_weight, position, min_fraction * max_weight, distance)
    return DirectionalParameters(None if scope == "per layer" else index, kernels)


def apply(
    adapter: Adapter,
    directions: Tensor,
    parameters: DirectionalParameters,
    row_normalization: str,
    rank: int,
) -> None:
    """Write the trial's edit into the (reset) adapter."""
    global_direction = None
    if parameters.direction_index is not None:
        global_direction = direction_at(directions, parameters.direction_index)
    for slot in adapter.slots:
        kernel = parameters.kernels.get(slot.writer.component)
        weight = kernel.weight_at(slot.writer.layer) if kernel else 0.0
        if weight == 0.0:
            continue
        direction = global_direction if global_direction is not None else directions[slot.writer.layer + 1]
        base = slot.base_weight()
        a, b = ablation_factors(base, direction.to(base.device), weight, row_normalization, rank)
        slot.write(a, b)


class DirectionalMethod(AdapterEdits):
    """Directional ablation with a per-component weight kernel over layers (reset, deltas and
    edited layers: the adapter's, see AdapterEdits)."""

    name = "directional"
    edits_in_adapter = True
    preparation = None  # the refusal directions are all it needs

    def __init__(self, context: MethodContext):
        self.adapter = context.adapter
        self.directions = context.directions
        self.settings: DirectionalSettings = context.settings
        self.n_layers = context.n_layers
        self.components = context.components

    @staticmethod
    def adapter_rank(settings: DirectionalSettings) -> int:
        return settings.full_normalization_rank if settings.row_normalization == "full" else 1

    @staticmethod
    def pass_observers(adapter, settings, keep_on) -> dict:
        return {}

    @staticmethod
    def prepare(inputs) -> None:
        return None

    @staticmethod
    def prepared_summary(prepared) -> dict:
        return {}

    def suggest(self, trial) -> DirectionalParameters:
        return suggest(trial, self.settings.search, self.n_layers, self.components)

    def apply(self, parameters: DirectionalParameters) -> None:
        rank = self.adapter_rank(self.settings)
        apply(self.adapter, self.directions, parameters, self.settings.row_normalization, rank)

    def describe(self, parameters: DirectionalParameters) -> dict:
        return parameters.as_dict()

    def layer_profile(self, parameters: DirectionalParameters) -> dict:
        layers = range(self.n_layers)
        weights = {c: [kernel.weight_at(layer) for layer in layers] for c, kernel in parameters.kernels.items()}
        return {"weights": weights}


def ablation_factors(
    weight: Tensor, direction: Tensor, strength: float, row_normalization: str, rank: int
) -> tuple[Tensor, Tensor]:
    """(A, B) with B @ A the edit of `weight` (experts, out, in), float32."""
    v = F.normalize(direction.float(), dim=0)
    if row_normalization == "pre":
        out_norms = weight.norm(dim=2, keepdim=True)  # (experts, out, 1)
        a = torch.einsum("o,eoi->ei", v, weight / out_norms.clamp_min(1e-12)).unsqueeze(1)
        b = -strength * (out_norms * v[None, :, None])
        return a, b
    projection = torch.einsum("o,eoi->ei", v, weight).unsqueeze(1)  # vᵀW: (experts, 1, in)
    if row_normalization == "none":
        b = (-strength * v)[None, :, None].expand(weight.shape[0], -1, -1)
        return projection, b.contiguous()
    return _norm_preserving_factors(weight, v, projection, strength, rank)


def _norm_preserving_factors(
    weight: Tensor, v: Tensor, projection: Tensor, strength: float, rank: int
) -> tuple[Tensor, Tensor]:
    """Projection plus exact norm restoration of the `rank − 1` rows it shrinks most.

    Row j after the projection is r_j = w_j − w·p_j·v with p_j = vᵀw_j; restoring its norm
    means scaling it by c_j = n_j / |r_j|, i.e. adding (c_j − 1)·r_j. Doing that for every
    row is a full-rank change, so only the rows whose norm drops the most get it (one rank
    each); every other row shrinks by less than the least of those. Unlike a truncated SVD
    of the full change, this keeps the projection exact: no row keeps any v component at w = 1.
    """
    experts, out_features, in_features = weight.shape
    extra = min(rank - 1, in_features)
    projection = projection[:, 0, :]  # (experts, in)
    kept_sq = weight.square().sum(dim=1) - (2 * strength - strength**2) * projection.square()
    scale = weight.norm(dim=1) / kept_sq.clamp_min(1e-12).sqrt()  # c_j
    a = weight.new_zeros(experts, 1 + extra, in_features)
    b = weight.new_zeros(experts, out_features, 1 + extra)
    a[:, 0] = projection
    b[:, :, 0] = -strength * v
    if extra:
        rows = (scale - 1).abs().topk(extra, dim=1).indices  # (experts, extra)
        for expert in range(experts):
            for slot, row in enumerate(rows[expert].tolist(), start=1):
                shrunk = weight[expert, :, row] - strength * projection[expert, row] * v
                b[expert, :, slot] = (scale[expert, row] - 1) * shrunk
                a[expert, slot, row] = 1.0
    return a, b
