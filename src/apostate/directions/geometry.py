"""Residual geometry per position: where harmless and harmful residuals sit, and how well the
refusal direction tells them apart. Pure tensor math; `apostate inspect` (inspect.py) feeds it.

Inputs are the last-token residuals of every direction prompt, `harmless` (n₀, positions,
hidden) and `harmful` (n₁, positions, hidden), winsorized as a run winsorizes them (position 0
is the embedding output, position l + 1 the output of decoder layer l). Per position p, with
μ₀, μ₁ the harmless and harmful means and v = `refusal_directions(μ₀, μ₁, orthogonalize)`
(the run's direction, with the run's orthogonalize_direction):

- `harmless_norm` ‖μ₀‖, `harmful_norm` ‖μ₁‖: how large the residual stream is there;
- `means_cosine` cos(μ₀, μ₁) = μ₀·μ₁ / (‖μ₀‖ ‖μ₁‖) (0 where a mean is zero): near 1, the
  two sets share most of their mean and differ in a small part of it;
- `gap` (μ₁ − μ₀)·v: how far apart the means are along the direction (‖μ₁ − μ₀‖ without
  orthogonalizing; the part of μ₁ − μ₀ orthogonal to μ₀ with it);
- `cosine_previous` v_p·v_{p−1}, `cosine_next` v_p·v_{p+1}: whether the direction holds
  steady across layers (near 1) or turns;
- `auc`, `cohens_d`: separability of the two sets projected on the direction, held out
  (`held_out_projections`), as the ROC AUC `roc_auc` and Cohen's d `cohens_d`.

Where the means do not differ along any direction (gap ≤ 1e-4 · max(‖μ₀‖, ‖μ₁‖): the embedding
output, when every prompt ends on the same template token) the direction is undefined: its
cosines are None, `auc` 0.5 and `cohens_d` 0, by definition (nothing to project on).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from apostate.directions.refusal import refusal_directions

UNDEFINED_GAP = 1e-4  # relative to the larger mean's norm: below it the means differ by rounding only


@dataclass
class LayerGeometry:
    """The quantities of one residual position (see the module's docstring for each formula)."""

    position: int  # 0: the embeddings; l + 1: the output of decoder layer l
    harmless_norm: float
    harmful_norm: float
    means_cosine: float
    gap: float
    cosine_previous: float | None  # None: first position, or a direction undefined here or there
    cosine_next: float | None
    auc: float
    cohens_d: float
    defined: bool  # whether the direction is defined here

    @property
    def layer(self) -> int | None:
        """The decoder layer whose output this is (a run's `direction_index`); None: the embeddings."""
        return self.position - 1 if self.position > 0 else None


def layer_geometry(harmless: Tensor, harmful: Tensor, orthogonalize: bool) -> list[LayerGeometry]:
    """One `LayerGeometry` per position of the (prompts, positions, hidden) residuals."""
    if harmless.shape[0] < 2 or harmful.shape[0] < 2:
        raise ValueError("held-out separability needs at least 2 prompts on each side")
    harmless, harmful = harmless.double(), harmful.double()
    harmless_mean, harmful_mean = harmless.mean(0), harmful.mean(0)
    directions = refusal_directions(harmless_mean, harmful_mean, orthogonalize)
    gaps = ((harmful_mean - harmless_mean) * directions).sum(-1)
    norms = (harmless_mean.norm(dim=-1), harmful_mean.norm(dim=-1))
    defined = gaps > UNDEFINED_GAP * torch.maximum(*norms)
    neighbours = (directions[1:] * directions[:-1]).sum(-1).tolist()  # v_p · v_{p-1}, from p = 1
    both = (defined[1:] & defined[:-1]).tolist()
    previous = [None] + [
        cosine if ok else None for cosine, ok in zip(neighbours, both, strict=True)
    ]  # at p: v_p · v_{p-1}
    layers = []
    for position in range(harmless.shape[1]):
        harmless_scores, harmful_scores = held_out_projections(
            harmless[:, position], harmful[:, position], orthogonalize
        )
        separated = defined[position].item()
        layers.append(
            LayerGeometry(
                position=position,
                harmless_norm=norms[0][position].item(),
                harmful_norm=norms[1][position].item(),
                means_cosine=F.cosine_similarity(harmless_mean[position], harmful_mean[position], dim=0).item(),
                gap=gaps[position].item(),
                cosine_previous=previous[position],
                cosine_next=previous[position + 1] if position + 1 < len(previous) else None,
                auc=roc_auc(harmless_scores, harmful_scores) if separated else 0.5,
                cohens_d=cohens_d(harmless_scores, harmful_scores) if separated else 0.0,
                defined=separated,
            )
        )
    return layers


def held_out_projections(harmless: Tensor, harmful: Tensor, orthogonalize: bool) -> tuple[Tensor, Tensor]:
    """Each prompt's residual (prompts, hidden) projected on the direction computed without it.

    Harmful prompt i: s_i = x_i · refusal_direction(μ₀, μ₁⁽⁻ⁱ⁾) with μ₁⁽⁻ⁱ⁾ = (n₁μ₁ − x_i) / (n₁ − 1);
    harmless prompt j likewise with μ₀⁽⁻ʲ⁾. Leave-one-out, because the direction is fitted to
    these prompts: projected on the direction made from them all, each prompt's own share of its
    side's mean (‖x‖² / n, large in a wide residual stream) pushes it to its side, and even two
    sets drawn alike separate perfectly.
    """
    harmless_mean, harmful_mean = harmless.mean(0), harmful.mean(0)
    count0, count1 = harmless.shape[0], harmful.shape[0]
    without_harmful = (count1 * harmful_mean - harmful) / (count1 - 1)  # (n₁, hidden): μ₁⁽⁻ⁱ⁾
    without_harmless = (count0 * harmless_mean - harmless) / (count0 - 1)  # (n₀, hidden): μ₀⁽⁻ʲ⁾
    harmful_directions = refusal_directions(harmless_mean.expand_as(harmful), without_harmful, orthogonalize)
    harmless_directions = refusal_directions(without_harmless, harmful_mean.expand_as(harmless), orthogonalize)
    return (harmless * harmless_directions).sum(-1), (harmful * harmful_directions).sum(-1)


def roc_auc(negatives: Tensor, positives: Tensor) -> float:
    """ROC AUC of scores, positives (harmful) against negatives (harmless): over all pairs,
    P(s₁ > s₀) + ½ P(s₁ = s₀) (the Mann-Whitney U over n₀n₁). 0.5: no separation; 1: every
    harmful prompt scores above every harmless one; 0: the reverse."""
    above = (positives[:, None] > negatives[None, :]).double().mean()
    tied = (positives[:, None] == negatives[None, :]).double().mean()
    return (above + 0.5 * tied).item()


def cohens_d(negatives: Tensor, positives: Tensor) -> float:
    """Cohen's d of scores: (mean₁ − mean₀) / s, s² = ((n₁ − 1)s₁² + (n₀ − 1)s₀²) / (n₀ + n₁ − 2)
    with s₀², s₁² the unbiased variances; the distance of the two means in pooled standard
    deviations (0 where both are equal; ±inf where s = 0 and they are not)."""
    difference = (positives.mean() - negatives.mean()).item()
    count0, count1 = len(negatives), len(positives)
    pooled = ((count1 - 1) * positives.var() + (count0 - 1) * negatives.var()) / (count0 + count1 - 2)
    spread = math.sqrt(max(pooled.item(), 0.0))
    if spread == 0.0:
        return 0.0 if difference == 0.0 else math.copysign(math.inf, difference)
    return difference / spread


def pca_2d(points: Tensor) -> tuple[Tensor, list[float]]:
    """(n, 2) coordinates of `points` (n, hidden) on their first two principal components, and the
    share of the total variance each explains: the SVD X − mean(X) = U S Vᵀ gives the
    coordinates U[:, :2] S[:2] and the shares S²[:2] / ΣS² (0 where the points coincide).
    A principal axis is a line, so the sign of each coordinate is arbitrary."""
    centred = points.double() - points.double().mean(0)
    left, singular, _ = torch.linalg.svd(centred, full_matrices=False)
    coordinates = torch.zeros(points.shape[0], 2, dtype=torch.float64)
    kept = min(2, singular.shape[0])
    coordinates[:, :kept] = left[:, :kept] * singular[:kept]
    total = (singular**2).sum().item()
    shares = [(singular[k] ** 2).item() / total if total > 0 and k < kept else 0.0 for k in range(2)]
    return coordinates.float(), shares


def best_layer(layers: list[LayerGeometry]) -> LayerGeometry | None:
    """The position whose direction separates best: highest AUC, then highest Cohen's d (the AUC
    saturates at 1 once the sets no longer overlap); None where no direction is defined."""
    defined = [layer for layer in layers if layer.defined]
    return max(defined, key=lambda layer: (layer.auc, layer.cohens_d), default=None)
