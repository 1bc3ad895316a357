"""Where one side's prompts come from and how they are split: the `[harmless]` and `[harmful]`
tables of the settings."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class PromptSetSpec(BaseModel):
    """Where one side's prompts come from and how they are split."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(
        description=(
            "Prompt source: 'bundled:harmless' / 'bundled:harmful' (shipped with apostate), "
            "a local .txt (one prompt per line), .jsonl or .csv file (any value ending so, starting with "
            "., / or ~, naming more than one folder level, or that exists), or else a Hugging Face dataset id ('name' or 'owner/name')."
        )
    )
    split: str | None = Field(
        default=None,
        description="Dataset split for Hugging Face datasets, e.g. 'train' or 'train[:600]'.",
    )
    column: str | None = Field(
        default=None,
        description="Column holding the prompt (datasets, .jsonl, .csv). Unset: 'prompt', 'text' or 'instruction', whichever exists.",
    )
    revision: str | None = Field(default=None, description="Hugging Face dataset revision (commit hash or tag).")
    system_prompt: str | None = Field(
        default=None, description="System prompt for this set; overrides the global system_prompt."
    )
    prefix: str = Field(default="", description="Text put before every prompt of this set.")
    suffix: str = Field(default="", description="Text put after every prompt of this set.")
    direction_count: int = Field(default=320, ge=1, description="Prompts used to compute refusal directions.")
    evaluation_count: int = Field(default=100, ge=1, description="Prompts used to score trials during the search.")
    heldout_count: int = Field(
        default=100, ge=0, description="Prompts never seen by the search, used for the final report."
    )
    shuffle_seed: int = Field(
        default=0,
        description="Seed of the shuffle before splitting (the three subsets never overlap).",
    )
