"""How far a model moved: KL divergence of first-token distributions, and refusal counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..decoding import CpuKernels, PromptSet
from ..progress import track
from ..prompts import Texts
from ..settings import Settings
from .refusals import RefusalDetector


@dataclass(frozen=True)
class Scores:
    kl: float
    refusals: int
    total: int

    @property
    def refusal_rate(self) -> float:
        return self.refusals / self.total if self.total else 0.0

    def __str__(self) -> str:
        return scores_line(self.refusals, self.total, self.kl)


def scores_line(refusals: int, total: int, kl: float) -> str:
    """'refusals 4/50 (8.0%), KL 0.0834': how every result is written."""
    rate = refusals / total if total else 0.0
    return f"refusals {refusals}/{total} ({rate:.1%}), KL {kl:.4f}"


class Scorer:
    """Scores a model on fixed harmless/harmful texts against the base model's first-token distributions.

    `edited_layers` (where a method can tell): the decoder layers where the model differs from
    the base; the prompt sets then skip the work below the first of them (see decoding).
    """

    def __init__(
        self, harmless: PromptSet, harmful: PromptSet, detector: RefusalDetector, max_new_tokens: int, label: str
    ):
        self.harmless = harmless
        self.harmful = harmful
        self.detector = detector
        self.max_new_tokens = max_new_tokens
        self.label = label
        self.base_logprobs: torch.Tensor | None = None

    @property
    def harmful_count(self) -> int:
        return len(self.harmful)

    def record_base(self, model) -> Scores:
        """Measure the unedited model: its distributions become the KL reference."""
        self.base_logprobs = self.harmless.first_token_logprobs(model)
        self.harmless.remember_base(logprobs=self.base_logprobs)
        return Scores(0.0, self.count_refusals(model), self.harmful_count)

    def base_responses(self) -> list[list[int]]:
        """The token ids the base model answered the harmful prompts with (after `record_base`)."""
        return self.harmful.latest_responses()

    def resume_from_base(self, base_logprobs: torch.Tensor, base_responses: list[list[int]]) -> None:
        """Take the base model's scores measured earlier: its distributions, and its responses as drafts."""
        self.base_logprobs = base_logprobs
        self.harmless.remember_base(logprobs=base_logprobs)
        self.harmful.remember_base(responses=base_responses)

    def kl(self, model, edited_layers: set[int] | None = None) -> float:
        """KL(base ‖ model), averaged over the harmless prompts."""
        logprobs = self.harmless.first_token_logprobs(model, edited_layers)
        return kl_divergence(self.base_logprobs, logprobs)

    def count_refusals(self, model, edited_layers: set[int] | None = None) -> int:
        return sum(self.refusal_flags(model, edited_layers=edited_layers))

    def refusal_flags(self, model, early_stop: bool = True, edited_layers: set[int] | None = None) -> list[bool]:
        with track(f"{self.label}: refusals", self.harmful_count) as advance:
            responses = self.harmful.greedy_responses(
                model,
                self.max_new_tokens,
                stop_when=self.detector.decided if early_stop else None,
                edited_layers=edited_layers,
                advance=advance,
            )
        return [self.detector.is_refusal(response) for response in responses]

    def score(self, model) -> Scores:
        return Scores(self.kl(model), self.count_refusals(model), self.harmful_count)


def kl_divergence(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    return F.kl_div(logprobs, base_logprobs, reduction="batchmean", log_target=True).item()


def build_scorer(
    tokenizer,
    device,
    kernels: CpuKernels | None,
    settings: Settings,
    batch_size: int,
    texts: Texts,
    subset: str = "evaluation",
) -> Scorer:
    """The scorer of one subset of the prompts ('evaluation' during the search, 'heldout' after it)."""
    harmless = PromptSet(tokenizer, texts.of("harmless", subset), batch_size, device, kernels)
    harmful = PromptSet(
        tokenizer,
        texts.of("harmful", subset),
        batch_size,
        device,
        kernels,
        reuse_responses=settings.reuse_responses,
        nearness=harmless,
    )
    return Scorer(harmless, harmful, RefusalDetector(settings.refusal_markers), settings.max_response_tokens, subset)
