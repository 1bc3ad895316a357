"""Which judge decides what a response is, nested as `[judge]`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr


class JudgeSettings(BaseModel):
    """The judge that re-scores the Pareto front and the chosen trial (the search itself counts
    with refusal markers and the cheap broken checks, which cost nothing)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["markers", "model", "endpoint"] = Field(
        default="markers",
        description="'markers': refusal markers only (no re-scoring); 'model': a local judge model (judge.model); "
        "'endpoint': an OpenAI-compatible server (judge.url, judge.model).",
    )
    model: str | None = Field(
        default=None,
        description="The judge model: for 'model', anything apostate loads (hub id, folder, .gguf, 'demo'); "
        "for 'endpoint', the model name the server knows.",
    )
    url: str | None = Field(
        default=None, description="Base URL of the OpenAI-compatible endpoint, e.g. 'http://127.0.0.1:8080/v1'."
    )
    api_key: SecretStr | None = Field(
        default=None,
        description="API key of the endpoint (better set in APOSTATE_JUDGE__API_KEY or OPENAI_API_KEY); "
        "never printed or written to any file.",
        exclude=True,
    )
    scope: Literal["marker-refusals", "all"] = Field(
        default="marker-refusals",
        description="'marker-refusals': the judge reads only the responses the refusal markers call refusals, "
        "and a refusal stands only if it agrees (small local judges are precise this way, and it is cheap); "
        "'all': the judge labels every response (refusal, evasive, compliance or broken), which also finds covert "
        "refusals without marker words: for strong judges, such as a large model behind an endpoint.",
    )
    batch_size: int = Field(default=8, ge=1, description="Pairs per forward pass of a local judge model.")
    concurrency: int = Field(default=4, ge=1, description="Requests in flight at once to an endpoint.")
    timeout: float = Field(default=60.0, gt=0, description="Seconds an endpoint request may take.")
