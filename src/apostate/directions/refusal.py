"""Refusal directions: per residual position, the normalized difference of harmful and harmless means.

Position 0 is the embedding output, position l + 1 the output of decoder layer l.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def refusal_directions(harmless_mean: Tensor, harmful_mean: Tensor, orthogonalize: bool) -> Tensor:
    """(positions, hidden) unit directions `normalize(harmful_mean - harmless_mean)`.

    With `orthogonalize`, the component along the harmless mean is removed first
    ("projected abliteration"): only what separates refusal from ordinary answering remains.
    """
    difference = harmful_mean - harmless_mean
    if orthogonalize:
        harmless_unit = F.normalize(harmless_mean, dim=-1)
        difference = difference - (difference * harmless_unit).sum(-1, keepdim=True) * harmless_unit
    return F.normalize(difference, dim=-1)


def direction_agreement(harmless_halves: tuple[Tensor, Tensor], harmful_halves: tuple[Tensor, Tensor]) -> Tensor:
    """(positions,) cos(d₀, d₁), where dₕ = harmful_meanₕ − harmless_meanₕ over half h of the prompts.

    A split-half reliability of the refusal direction: the two halves share the prompts' true
    difference and not their noise, so near 1 the direction is measured, near 0 it is noise
    (0 where a half's difference is zero)."""
    first = harmful_halves[0] - harmless_halves[0]
    second = harmful_halves[1] - harmless_halves[1]
    return F.cosine_similarity(first, second, dim=-1, eps=1e-30)


def winsorize(residuals: Tensor, quantile: float) -> Tensor:
    """Clamp each vector's components to the `quantile` of its own absolute values (1.0: unchanged).

    Tames the few huge "massive activation" components some models carry.
    """
    if quantile >= 1.0:
        return residuals
    limit = torch.quantile(residuals.abs().float(), quantile, dim=-1, keepdim=True).to(residuals.dtype)
    return residuals.clamp(-limit, limit)


def direction_at(directions: Tensor, index: float) -> Tensor:
    """The direction at a fractional layer index: linear interpolation of its neighbours, renormalized.

    `index` counts decoder layers (index i is the output of layer i, position i + 1).
    """
    position = index + 1
    lower = min(max(int(math.floor(position)), 0), directions.shape[0] - 1)
    upper = min(lower + 1, directions.shape[0] - 1)
    fraction = position - lower
    return F.normalize(torch.lerp(directions[lower], directions[upper], fraction), dim=-1)
