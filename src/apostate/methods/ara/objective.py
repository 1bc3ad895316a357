"""The per-module objective of Arbitrary-Rank Ablation, and its LBFGS fit.

For one residual writer with base weight W and captured last-position outputs
Y_g (harmless) and Y_b (harmful), an edit ΔW gives outputs Y'_b = Y_b + X_b ΔWᵀ (and Y'_g
likewise). With squared distances d(a, b) = |a − b|² / s², s² = mean |Y_g|²:

    L = p · mean_i d(Y'_g,i, Y_g,i)                      keep harmless outputs in place
      + s · mean_i [ pull_i − o · push_i ]               harmful outputs: toward harmless, away from their own

knn (the public form): pull_i = mean of d(Y'_b,i, ·) over the k nearest harmless outputs,
push_i = the same over the k nearest original harmful outputs. Two flaws: the neighbour set
changes discretely, so the gradient jumps; and pull − o·push is (1 − o)|Y'_b,i|² + linear
terms, unbounded below for o > 1 along every input direction the preserve term does not pin
(harmful inputs outside the span of the harmless ones), so LBFGS runs the weight off to
infinity: the KL > 9 explosions seen with overcorrect > 1.

smooth (ours): pull_i = softmin_T of d(Y'_b,i, Y_g,·) = −T log mean_j exp(−d_ij / T), a smooth
stand-in for the k nearest (small T ≈ nearest, large T ≈ all); push_i = m (1 − exp(−q_i / m))
with q_i the softmin distance to the original harmful outputs and m the typical harmful-to-
harmless distance: the push saturates at m, so L is bounded below for every o and grows
without bound as the edit grows. Both parts are smooth everywhere. On top, a trust region
caps |ΔW|_F at a fraction of |W|_F.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from apostate.methods.ara.captures import ModuleCapture


@dataclass(frozen=True)
class ObjectiveWeights:
    preserve: float
    steer: float
    overcorrect: float
    temperature: float  # smooth
    neighbours: int  # knn


def squared_distances(points: Tensor, references: Tensor, scale: Tensor) -> Tensor:
    return torch.cdist(points, references).square() / scale


def softmin(distances: Tensor, temperature: float) -> Tensor:
    """−T log mean_j exp(−d_ij / T), per row: between the nearest distance and the mean one."""
    n = distances.shape[1]
    return -temperature * (torch.logsumexp(-distances / temperature, dim=1) - math.log(n))


def nearest_mean(distances: Tensor, k: int) -> Tensor:
    return distances.topk(min(k, distances.shape[1]), dim=1, largest=False).values.mean(dim=1)


class Objective:
    """L(edited harmless outputs, edited harmful outputs) for one module's capture."""

    def __init__(self, capture: ModuleCapture, weights: ObjectiveWeights, kind: str):
        self.capture = capture
        self.weights = weights
        self.kind = kind
        self.scale = capture.harmless_outputs.square().sum(dim=1).mean().clamp_min(1e-12)
        start = squared_distances(capture.harmful_outputs, capture.harmless_outputs, self.scale)
        self.margin = softmin(start, 1.0).mean().clamp_min(1e-6)  # typical distance still to travel

    def __call__(self, harmless_outputs: Tensor, harmful_outputs: Tensor) -> Tensor:
        w, c = self.weights, self.capture
        preserve = (harmless_outputs - c.harmless_outputs).square().sum(dim=1).mean() / self.scale
        to_harmless = squared_distances(harmful_outputs, c.harmless_outputs, self.scale)
        to_own = squared_distances(harmful_outputs, c.harmful_outputs, self.scale)
        if self.kind == "knn":
            pull = nearest_mean(to_harmless, w.neighbours)
            push = nearest_mean(to_own, w.neighbours)
        else:
            pull = softmin(to_harmless, w.temperature)
            push = self.margin * (1 - torch.exp(-softmin(to_own, w.temperature) / self.margin))
        return w.preserve * preserve + w.steer * (pull - w.overcorrect * push).mean()


def fit(
    objective: Objective,
    parameters: list[Tensor],
    output_change: Callable[[Tensor], Tensor],
    steps: int,
) -> float:
    """Minimize the objective over `parameters` with LBFGS (strong-Wolfe line search).

    `output_change(coords)` maps input coordinates to the change of the outputs the current
    parameters make. Returns the final loss (possibly non-finite; the caller checks).
    """
    c = objective.capture
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.LBFGS(parameters, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective(
            c.harmless_outputs + output_change(c.harmless_coords),
            c.harmful_outputs + output_change(c.harmful_coords),
        )
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
        with torch.no_grad():
            loss = objective(
                c.harmless_outputs + output_change(c.harmless_coords),
                c.harmful_outputs + output_change(c.harmful_coords),
            )
    for parameter in parameters:
        parameter.requires_grad_(False)
    return loss.item()
