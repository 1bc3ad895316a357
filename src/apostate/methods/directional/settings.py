"""The ranges directional ablation samples its trial parameters from, nested as `[search]`."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from ..ranges import RangeModel


class SearchSpace(RangeModel):
    """Ranges the optimizer samples directional-ablation parameters from.

    Layer positions are fractions of the last layer index, so one config fits any depth.
    """

    range_prefix: ClassVar[str] = "search."

    direction_index: tuple[float, float] = Field(
        default=(0.4, 0.9), description="Range of the refusal-direction index, as fractions of the last layer index."
    )
    max_weight: tuple[float, float] = Field(
        default=(0.8, 1.5), description="Range of a component's peak ablation weight."
    )
    max_weight_position: tuple[float, float] = Field(
        default=(0.5, 1.0), description="Range of the layer with the peak weight, as fractions of the last layer index."
    )
    min_weight: tuple[float, float] = Field(
        default=(0.0, 1.0), description="Range of the weight at the kernel's edge, as a fraction of the peak weight."
    )
    min_weight_distance: tuple[float, float] = Field(
        default=(0.05, 0.6), description="Range of the kernel's half-width, as fractions of the last layer index."
    )
    per_layer_directions: bool = Field(
        default=True, description="Let the optimizer choose per-layer directions instead of one global direction."
    )
