"""Settings models that hold (low, high) ranges of trial parameters."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel, ConfigDict, model_validator


class RangeModel(BaseModel):
    """Settings holding (low, high) ranges: unknown keys are errors, every range must be ordered."""

    model_config = ConfigDict(extra="forbid")
    range_prefix: ClassVar[str] = ""

    @model_validator(mode="after")
    def _ranges_ordered(self):
        for name, value in self:
            if isinstance(value, tuple) and len(value) == 2 and value[0] > value[1]:
                raise ValueError(f"{self.range_prefix}{name}: lower bound {value[0]} is above upper bound {value[1]}")
        return self
