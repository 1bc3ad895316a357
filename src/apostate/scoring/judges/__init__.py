"""Judges: what decides whether a response is a refusal, a real answer, or broken.

One interface (`Judge`): `name` (it keys cached verdicts), `check()` (once, at start-up: one
clear error line if the judge cannot work), and `verdicts(prompts, responses)`. Three kinds:
- `markers` (markers.py): refusal marker strings, then the cheap broken checks; the search's;
- `model` (model.py): a local judge model, decided from one forward pass per batch;
- `endpoint` (endpoint.py): an OpenAI-compatible server.
A model or endpoint judge runs as a `RefinedJudge`: the cheap broken checks (degeneration.py)
first, then the markers, then the judge on the responses its scope names (by default only the
marker refusals, which it confirms or overturns), its verdicts cached per run (cache.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ..degeneration import broken_reason
from ..verdicts import Verdict
from .cache import CachedJudge, VerdictCache
from .markers import MarkerJudge
from .settings import JudgeSettings

if TYPE_CHECKING:
    from ...settings import Settings

VERDICT_CACHE = "verdicts.sqlite"


ALL_LABELS = (Verdict.REFUSAL, Verdict.COMPLIANCE, Verdict.BROKEN)
AGREES = (Verdict.REFUSAL, Verdict.COMPLIANCE)  # a judge checking a marker refusal: does it agree?


class Judge(Protocol):
    name: str

    def check(self) -> None: ...

    def verdicts(self, prompts: list[str], responses: list[str], choices: tuple[Verdict, ...]) -> list[Verdict | None]:
        """One verdict per pair, one of `choices` where the judge can be held to them (a model judge);
        None where it named no label (an endpoint's reply)."""
        ...


class RefinedJudge:
    """The cheap broken checks first (what they flag is broken, whatever a judge says); then the
    markers; then the judge, on the responses its scope names:
    - 'marker-refusals': only the marker refusals, and a refusal stands only if the judge agrees
      (refusal or compliance, its only choices);
    - 'all': every response the cheap checks pass, with all three labels.
    Where the judge names no label, the marker verdict stands."""

    def __init__(self, judge, markers: MarkerJudge, scope: str = "marker-refusals"):
        self.judge = judge
        self.markers = markers
        self.scope = scope
        self.name = judge.name if scope == "all" else f"{judge.name} (on marker refusals)"

    def check(self) -> None:
        self.judge.check()

    def verdicts(self, prompts: list[str], responses: list[str]) -> list[Verdict]:
        results = [
            Verdict.BROKEN
            if broken_reason(prompt, response)
            else Verdict.REFUSAL
            if self.markers.refuses(response)
            else Verdict.COMPLIANCE
            for prompt, response in zip(prompts, responses, strict=True)
        ]
        wanted = (Verdict.REFUSAL, Verdict.COMPLIANCE) if self.scope == "all" else (Verdict.REFUSAL,)
        ask = [index for index, verdict in enumerate(results) if verdict in wanted]
        if not ask:
            return results
        choices = ALL_LABELS if self.scope == "all" else AGREES
        judged = self.judge.verdicts([prompts[i] for i in ask], [responses[i] for i in ask], choices)
        for index, verdict in zip(ask, judged, strict=True):
            results[index] = verdict or results[index]
        return results


def marker_judge(settings: Settings) -> MarkerJudge:
    return MarkerJudge(settings.refusal_markers)


def build_judge(settings: Settings, run_dir: Path | None) -> RefinedJudge | None:
    """The configured re-scoring judge, checked (None for `markers`: the search's count stands).
    `run_dir`: where its verdicts are cached (None: not cached)."""
    judge_settings: JudgeSettings = settings.judge
    if judge_settings.kind == "markers":
        return None
    judge = _model_judge(settings) if judge_settings.kind == "model" else _endpoint_judge(judge_settings)
    judge.check()
    if run_dir is not None:
        judge = CachedJudge(judge, VerdictCache(run_dir / VERDICT_CACHE))
    return RefinedJudge(judge, marker_judge(settings), judge_settings.scope)


def _model_judge(settings: Settings):
    from ...errors import ApostateError
    from ...model.loading import check_model, load_model, load_tokenizer
    from ...model.sources import resolve_source
    from ...progress import can_ask, console
    from .model import ModelJudge

    name = settings.judge.model
    if not name:
        raise ApostateError("judge.kind 'model' needs a judge model: set --judge.model (hub id, folder, .gguf or demo)")
    source = resolve_source(name, None, settings.cache_path())
    judge_settings = settings.model_copy(
        update={"model": name, "model_revision": None, "chat_template": None, "quantization": "none"}
    )
    judge_settings = check_model(source, judge_settings, can_ask(settings.headless))
    try:
        tokenizer = load_tokenizer(source, judge_settings)
    except ApostateError as error:
        if "no chat template" in str(error):
            raise ApostateError(
                f"judge model '{source.name}' has no chat template, so it cannot read the rubric; "
                "pick a chat (instruct) model as judge"
            ) from None
        raise ApostateError(f"judge model: {error}") from None
    console.print(f"Loading judge model [bold]{source.name}[/]...")
    loaded = load_model(source, judge_settings, tokenizer)
    return ModelJudge(loaded.model, tokenizer, source.name, settings.judge.batch_size)


def _endpoint_judge(judge_settings: JudgeSettings):
    from ...errors import ApostateError
    from .endpoint import EndpointJudge

    if not judge_settings.url or not judge_settings.model:
        raise ApostateError("judge.kind 'endpoint' needs --judge.url and --judge.model (the server's model name)")
    key = judge_settings.api_key.get_secret_value() if judge_settings.api_key else os.environ.get("OPENAI_API_KEY")
    return EndpointJudge(
        judge_settings.url, judge_settings.model, key, judge_settings.concurrency, judge_settings.timeout
    )


__all__ = ["Judge", "JudgeSettings", "MarkerJudge", "RefinedJudge", "VerdictCache", "build_judge", "marker_judge"]
