"""Where the chosen trial's export is published on the Hugging Face hub, nested as `[upload]`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class UploadSettings(BaseModel):
    """The 'upload' action: which export goes to which hub repository. The token is never a
    setting: huggingface_hub reads HF_TOKEN or its login store (`hf auth login`) itself."""

    model_config = ConfigDict(extra="forbid")

    repo: str | None = Field(
        default=None,
        description="Hub repository to upload to, 'user/name' (or 'organization/name'); created if it does not "
        "exist. Needed for the 'upload' action (an interactive run asks for it).",
    )
    private: bool = Field(
        default=True,
        description="Create the repository private (false: public). A repository that exists keeps its visibility.",
    )
    export: Literal["model", "adapter", "gguf"] = Field(
        default="model",
        description="Which export to upload: 'model' (the merged model), 'adapter' (the LoRA adapter) or 'gguf' "
        "(the GGUF file, its Modelfile and card); saved "
        "first unless its folder already holds the chosen trial's export.",
    )
