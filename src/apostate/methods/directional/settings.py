"""Settings of directional ablation, nested as `[directional]`: how the edit is normalized, and the
ranges its trial parameters are sampled from (`[directional.search]`)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from apostate.methods.ranges import RangeModel, range_field


class SearchSpace(RangeModel):
    """Ranges the optimizer samples directional-ablation parameters from.

    Layer positions are fractions of the last layer index, so one config fits any depth.
    """

    range_prefix: ClassVar[str] = "directional.search."

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


class DirectionalSettings(RangeModel):
    """Directional ablation's knobs: only runs of `directional` measure them."""

    range_prefix: ClassVar[str] = "directional."

    row_normalization: Literal["none", "pre", "full"] = Field(
        default="full",
        description="'none': plain projection; 'pre': edit relative to unit-norm rows; 'full': also restore row norms (norm-preserving).",
    )
    full_normalization_rank: int = Field(
        default=3, ge=1, description="LoRA rank approximating the 'full' row-normalized edit."
    )
    search: SearchSpace = Field(default_factory=SearchSpace, description="Parameter ranges of the search.")


LEGACY_KEYS = ("row_normalization", "full_normalization_rank", "search")


def legacy_keys_moved(data: Any) -> Any:
    """Settings data with the top-level row_normalization, full_normalization_rank and [search] of
    run folders made before the [directional] table moved into that table."""
    if not isinstance(data, dict) or not any(key in data for key in LEGACY_KEYS):
        return data
    data = dict(data)
    table = dict(data.get("directional") or {})
    for key in LEGACY_KEYS:
        if key in data:
            table.setdefault(key, data.pop(key))
    data["directional"] = table
    return data
