"""The ablation weight of a component as a function of layer index.

A tent: `max_weight` at `max_weight_position`, falling linearly to `min_weight` at
`min_weight_distance` layers away, and 0 beyond that.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class WeightKernel:
    max_weight: float
    max_weight_position: float
    min_weight: float
    min_weight_distance: float

    def weight_at(self, layer: int) -> float:
        distance = abs(layer - self.max_weight_position)
        if distance > self.min_weight_distance:
            return 0.0
        fraction = distance / self.min_weight_distance if self.min_weight_distance > 0 else 0.0
        return self.max_weight + fraction * (self.min_weight - self.max_weight)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)
