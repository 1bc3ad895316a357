"""The GGUF export (`save-gguf`), nested as `[gguf]`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GgufSettings(BaseModel):
    """What the 'save-gguf' action writes, and how much of the edit its quantization may lose."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["same", "f16", "bf16", "q8_0"] = Field(
        default="q8_0",
        description="Tensor type of the GGUF file: 'q8_0', 'f16', 'bf16', or 'same' (each tensor in the type "
        "of the GGUF file the model came in as; an edited tensor of a type the gguf package cannot write "
        "goes in the next writable type up). Vectors (norms, biases) keep their type.",
    )
    score: bool = Field(
        default=True,
        description="Load the written file back and score it like a trial (refusals and KL on the evaluation "
        "and held-out prompts, next to the full-precision model's); the card shows both.",
    )
    max_lost_edit: float = Field(
        default=0.25,
        ge=0,
        le=1,
        description="Share of the edit's refusal reduction (base model's refusals less the full-precision "
        "model's) that the file may lose to quantization before the run and the card say it did.",
    )
