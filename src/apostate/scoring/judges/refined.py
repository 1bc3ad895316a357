"""The judge a run re-scores with: the cheap checks and markers first, then the configured judge
(see the package docstring), and building it from its settings."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from apostate.errors import ApostateError
from apostate.scoring.degeneration import broken_reason
from apostate.scoring.judges.cache import CachedJudge, VerdictCache
from apostate.scoring.judges.markers import MarkerJudge
from apostate.scoring.judges.settings import JudgeSettings
from apostate.scoring.verdicts import Verdict

VERDICT_CACHE = "verdicts.sqlite"


ALL_LABELS = (Verdict.REFUSAL, Verdict.EVASIVE, Verdict.COMPLIANCE, Verdict.BROKEN)
# A judge checking a marker refusal: open refusal, covert one (a marker word in a lecture), or an answer.
AGREES = (Verdict.REFUSAL, Verdict.EVASIVE, Verdict.COMPLIANCE)


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
      (refusal, evasive or compliance, its only choices);
    - 'all': every response the cheap checks pass, with all four labels (the only scope that
      finds evasions without a marker word).
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


def build_judge(
    settings: JudgeSettings, refusal_markers: list[str], run_dir: Path | None, open_model_judge: Callable[[], Judge]
) -> RefinedJudge | None:
    """The configured re-scoring judge, checked (None for `markers`: the search's count stands).
    `run_dir`: where its verdicts are cached (None: not cached); `open_model_judge`: loads the
    judge model (kind `model`; the session opens models)."""
    if settings.kind == "markers":
        return None
    judge = open_model_judge() if settings.kind == "model" else _endpoint_judge(settings)
    judge.check()
    if run_dir is not None:
        judge = CachedJudge(judge, VerdictCache(run_dir / VERDICT_CACHE))
    return RefinedJudge(judge, MarkerJudge(refusal_markers), settings.scope)


def _endpoint_judge(judge_settings: JudgeSettings):
    from apostate.scoring.judges.endpoint import EndpointJudge

    if not judge_settings.url or not judge_settings.model:
        raise ApostateError("judge.kind 'endpoint' needs --judge.url and --judge.model (the server's model name)")
    key = judge_settings.api_key.get_secret_value() if judge_settings.api_key else os.environ.get("OPENAI_API_KEY")
    return EndpointJudge(
        judge_settings.url, judge_settings.model, key, judge_settings.concurrency, judge_settings.timeout
    )
