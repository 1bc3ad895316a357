"""When the checks before the first trial warn (startup_checks): the `[checks]` table of the settings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class StartupChecks(BaseModel):
    """Limits of the checks before the first trial (search/startup_checks.py): past them, a warning."""

    model_config = ConfigDict(extra="forbid")

    min_base_refusal_share: float = Field(
        default=0.1,
        ge=0,
        le=1,
        description="Warn when the base model refuses fewer than this share of the harmful evaluation prompts "
        "(little refusal to remove: trials then differ by noise).",
    )
    max_base_harmless_refusal_share: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Warn when the base model refuses more than this share of a sample of harmless prompts "
        "(the harmless set is not harmless to it, or the refusal markers match ordinary answers).",
    )
    min_direction_agreement: float = Field(
        default=0.5,
        ge=-1,
        le=1,
        description="Warn when the refusal direction from one half of the direction prompts agrees with the "
        "other half's at a cosine below this in every layer (the direction is mostly noise).",
    )
