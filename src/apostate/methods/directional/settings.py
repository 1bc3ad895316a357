"""The ranges directional ablation samples its trial parameters from, nested as `[search]`."""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field

from ..ranges import RangeModel, range_field


class SearchSpace(RangeModel):
    """Ranges the optimizer samples directional-ablation parameters from.

    Layer positions are fractions of the last layer index, so one config fits any depth.
    """

    range_prefix: ClassVar[str] = "search."

    direction_index: tuple[float, float] = range_field(
        0.4, 0.9, "Range of the refusal-direction index, as fractions of the last layer index.", ge=0.0, le=1.0
    )
    max_weight: tuple[float, float] = range_field(0.8, 1.5, "Range of a component's peak ablation weight.")
    max_weight_position: tuple[float, float] = range_field(
        0.5, 1.0, "Range of the layer with the peak weight, as fractions of the last layer index."
    )
    min_weight: tuple[float, float] = range_field(
        0.0, 1.0, "Range of the weight at the kernel's edge, as a fraction of the peak weight."
    )
    min_weight_distance: tuple[float, float] = range_field(
        0.05,
        0.6,
        "Range of the kernel's half-width, as fractions of the last layer index (at least half a layer).",
        ge=0.0,
    )
    per_layer_directions: bool = Field(
        default=True, description="Let the optimizer choose per-layer directions instead of one global direction."
    )
