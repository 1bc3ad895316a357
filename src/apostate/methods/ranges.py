"""Settings models that hold (low, high) ranges of trial parameters."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator


def range_field(low: float, high: float, description: str, *, ge: float | None = None, le: float | None = None) -> Any:
    """A (low, high) range setting defaulting to (low, high); `ge`/`le`: bounds both ends must keep."""
    limits = {key: value for key, value in (("ge", ge), ("le", le)) if value is not None}
    return Field(
        default=(low, high), description=description, json_schema_extra={"range_limits": limits} if limits else None
    )


class RangeModel(BaseModel):
    """Settings holding (low, high) ranges: unknown keys are errors, every range must be ordered and in bounds."""

    model_config = ConfigDict(extra="forbid")
    range_prefix: ClassVar[str] = ""

    @model_validator(mode="after")
    def _ranges_ordered(self):
        for name, value in self:
            if not (isinstance(value, tuple) and len(value) == 2):
                continue
            setting = f"{self.range_prefix}{name}"
            if value[0] > value[1]:
                raise ValueError(f"{setting}: lower bound {value[0]} is above upper bound {value[1]}")
            extra = type(self).model_fields[name].json_schema_extra
            limits = extra.get("range_limits", {}) if isinstance(extra, dict) else {}
            if "ge" in limits and value[0] < limits["ge"]:
                raise ValueError(f"{setting}: lower bound {value[0]} is below {limits['ge']}, the least it can be")
            if "le" in limits and value[1] > limits["le"]:
                raise ValueError(f"{setting}: upper bound {value[1]} is above {limits['le']}, the most it can be")
        return self
