"""How far a model moved: KL divergence of next-token distributions on harmless prompts (the
first token, or the first k positions of the base model's own answer), and what its responses
to harmful prompts are (refusals, real answers, broken text), as a judge counts them."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from apostate.decoding import CpuKernels, PromptSet
from apostate.progress import track
from apostate.prompts import Texts
from apostate.scoring.judges.markers import MarkerJudge
from apostate.scoring.verdicts import Verdict, VerdictCounts


@dataclass(frozen=True)
class ScoringOptions:
    """The run's settings a scorer reads."""

    max_response_tokens: int  # tokens generated per response
    refusal_markers: list[str]  # the marker judge's
    reuse_responses: bool = True  # earlier trials' responses as speculative drafts
    kl_tokens: int = 1  # positions of the base model's answer the KL reads (1: the first token)


@dataclass(frozen=True)
class Scores:
    kl: float
    refusals: int
    total: int
    broken: int = 0

    @property
    def refusal_rate(self) -> float:
        return self.refusals / self.total if self.total else 0.0

    def __str__(self) -> str:
        return scores_line(self.refusals, self.total, self.kl, self.broken)


def scores_line(refusals: int, total: int, kl: float, broken: int = 0) -> str:
    """'refusals 4/50 (8.0%), KL 0.0834' (', broken 2' after the refusals where there are any):
    how every result is written."""
    rate = refusals / total if total else 0.0
    broken_part = f", broken {broken}" if broken else ""
    return f"refusals {refusals}/{total} ({rate:.1%}){broken_part}, KL {max(kl, 0.0):.4f}"  # old studies: see kl_divergence


class Scorer:
    """Scores a model on fixed harmless/harmful texts against the base model's first-token distributions.

    `edited_layers` (where a method can tell): the decoder layers where the model differs from
    the base; the prompt sets then skip the work below the first of them (see decoding).
    """

    def __init__(
        self,
        harmless: PromptSet,
        harmful: PromptSet,
        harmful_prompts: list[str],
        judge: MarkerJudge,
        max_new_tokens: int,
        label: str,
        kl_tokens: int = 1,
    ):
        self.harmless = harmless
        self.harmful = harmful
        self.harmful_prompts = harmful_prompts  # as the user wrote them (harmful holds them chat-templated)
        self.judge = judge
        self.max_new_tokens = max_new_tokens
        self.label = label
        self.kl_tokens = kl_tokens
        self.base_logprobs: torch.Tensor | None = None  # first token, (texts, vocab)
        self.base_answers: list[list[int]] = []  # the base model's to the harmless texts (kl_tokens > 1)
        self.answers: PromptSet | None = None  # the harmless texts followed by them
        self.base_answer_logprobs: list[torch.Tensor] | None = None

    @property
    def harmful_count(self) -> int:
        return len(self.harmful)

    def record_base(self, model) -> Scores:
        """Measure the unedited model: its distributions become the KL reference."""
        self.base_logprobs = self.harmless.first_token_logprobs(model)
        self.harmless.remember_base(logprobs=self.base_logprobs)
        self._answers_reference(model, self.base_harmless_answers(model))
        counts = self.count(model)
        return Scores(0.0, counts.refusals, counts.total, counts.broken)

    def base_harmless_answers(self, model) -> list[list[int]]:
        """The unedited model's greedy answers to the harmless prompts, as long as the KL reads them
        (empty for the first-token KL)."""
        if self.kl_tokens == 1:
            return []
        with track(f"{self.label}: base answers", len(self.harmless)) as advance:
            return self.harmless.greedy_tokens(model, self.kl_tokens - 1, advance=advance)

    def _answers_reference(self, model, answers: list[list[int]]) -> None:
        """The base model's distributions along its own answers (one pass; kl_tokens > 1 only)."""
        if self.kl_tokens == 1:
            return
        self.base_answers = [answer[: self.kl_tokens - 1] for answer in answers]
        self.answers = self.harmless.continued(self.base_answers)
        self.base_answer_logprobs = self.answers.answer_logprobs(model)
        self.answers.remember_base(logprobs=self.base_logprobs)
        self.harmful.nearness = self.answers  # its latest first-token distributions sign the model

    def base_responses(self) -> list[list[int]]:
        """The token ids the base model answered the harmful prompts with (after `record_base`)."""
        return self.harmful.latest_responses()

    def resume_from_base(
        self,
        base_logprobs: torch.Tensor,
        base_responses: list[list[int]],
        base_answers: list[list[int]] | None = None,
        model=None,
    ) -> None:
        """Take the base model's scores measured earlier: its distributions, its responses as drafts,
        and its answers to the harmless prompts (kl_tokens > 1: `model`, still unedited, measures
        its distributions along them once more: one pass, cheaper to redo than to store)."""
        self.base_logprobs = base_logprobs
        self.harmless.remember_base(logprobs=base_logprobs)
        self.harmful.remember_base(responses=base_responses)
        if self.kl_tokens > 1:
            self._answers_reference(model, base_answers or [])

    def kl(self, model, edited_layers: set[int] | None = None) -> float:
        """KL(base ‖ model), averaged over the harmless prompts: at the first token, or (kl_tokens > 1)
        averaged over the positions of each base answer first (see answer_kl)."""
        if self.kl_tokens == 1:
            return self.first_token_kl(model, edited_layers)
        base = self.base_answer_logprobs
        per_position = self.answers.answer_logprobs(
            model, edited_layers, reduce=lambda i, rows: _kl_rows(base[i], rows)
        )
        return answer_kl_of(per_position)

    def first_token_kl(self, model, edited_layers: set[int] | None = None) -> float:
        """KL(base ‖ model) of the first token, whatever kl_tokens is."""
        return kl_divergence(self.base_logprobs, self.harmless.first_token_logprobs(model, edited_layers))

    def harmless_refusals(self, model) -> list[bool]:
        """Per harmless prompt: does the model's short answer hold a refusal marker (over-refusal)?"""
        with track(f"{self.label}: harmless answers", len(self.harmless)) as advance:
            responses = self.harmless.greedy_responses(model, self.max_new_tokens, self.judge.decided, advance=advance)
        return [self.judge.refuses(response) for response in responses]

    def count(self, model, edited_layers: set[int] | None = None, enough_failures: int | None = None) -> VerdictCounts:
        """The verdicts' counts over the harmful prompts. With `enough_failures`, generation stops
        once that many responses have failed (refused or broken: the verdict of a finished response
        is final): the counts are then those of the responses finished by then, total below
        `harmful_count` (the full count could only be higher)."""
        if enough_failures is None:
            return VerdictCounts.of(self.verdicts(model, edited_layers=edited_layers))
        failed = []

        def give_up(index: int, tokens: list[int]) -> bool:
            text = self.harmful.tokenizer.decode(tokens, skip_special_tokens=True)
            failed.append(self.judge.verdict(self.harmful_prompts[index], text) != Verdict.COMPLIANCE)
            return sum(failed) >= enough_failures

        responses = self.responses(model, edited_layers=edited_layers, give_up=give_up)
        finished = [
            (prompt, text) for prompt, text in zip(self.harmful_prompts, responses, strict=True) if text is not None
        ]
        return VerdictCounts.of(self.judge.verdict(prompt, text) for prompt, text in finished)

    def verdicts(self, model, early_stop: bool = True, edited_layers: set[int] | None = None) -> list[Verdict]:
        """The marker judge's verdict on each harmful prompt's response."""
        responses = self.responses(model, early_stop, edited_layers)
        return self.judge.verdicts(self.harmful_prompts, responses)

    def responses(
        self,
        model,
        early_stop: bool = True,
        edited_layers: set[int] | None = None,
        max_new_tokens: int | None = None,
        give_up=None,
    ) -> list[str | None]:
        """The greedy responses to the harmful prompts, `max_new_tokens` long (default: the search's
        length); with `early_stop`, each stops at its first refusal marker (the marker verdict is
        decided there), so those are cut short. `give_up`: see PromptSet.greedy_responses."""
        with track(f"{self.label}: refusals", self.harmful_count) as advance:
            return self.harmful.greedy_responses(
                model,
                max_new_tokens or self.max_new_tokens,
                stop_when=self.judge.decided if early_stop else None,
                edited_layers=edited_layers,
                advance=advance,
                give_up=give_up,
            )

    def score(self, model) -> Scores:
        kl = self.kl(model)
        counts = self.count(model)
        return Scores(kl, counts.refusals, counts.total, counts.broken)


def kl_divergence(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    """KL(base ‖ model) of next-token distributions, averaged over prompts. A divergence is never
    negative; computed in float32 for two nearly equal distributions it can come out a rounding
    below zero, which is 0."""
    return max(F.kl_div(logprobs, base_logprobs, reduction="batchmean", log_target=True).item(), 0.0)


def answer_kl(base: list[torch.Tensor], model: list[torch.Tensor]) -> float:
    """KL(base ‖ model) along the base model's own answers, teacher-forced:

        KL_k = (1/N) Σ_prompts (1/n_i) Σ_{t < n_i} KL(p_base(· | x, y_<t) ‖ p_model(· | x, y_<t))

    with y the base answer and n_i = min(k, its length + 1). At k = 1 it is the first-token KL."""
    return answer_kl_of([_kl_rows(base_rows, rows) for base_rows, rows in zip(base, model, strict=True)])


def _kl_rows(base_rows: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """KL(base ‖ model) at each position, (positions,)."""
    return F.kl_div(rows, base_rows, reduction="none", log_target=True).sum(-1)


def answer_kl_of(per_position: list[torch.Tensor]) -> float:
    """answer_kl from each prompt's per-position KL: the mean over positions, then over prompts."""
    per_prompt = [float(kls.mean()) for kls in per_position]
    return max(sum(per_prompt) / len(per_prompt), 0.0)


def build_scorer(
    tokenizer,
    device,
    kernels: CpuKernels | None,
    options: ScoringOptions,
    batch_size: int,
    texts: Texts,
    subset: str = "evaluation",
) -> Scorer:
    """The scorer of one subset of the prompts ('evaluation' during the search, 'heldout' after it)."""
    # Harmless answers are generated for the base model (k-token KL) and then for over-refusals:
    # the base's answers draft the later ones (a nearby model's answers to harmless prompts match).
    harmless = PromptSet(tokenizer, texts.of("harmless", subset), batch_size, device, kernels, options.reuse_responses)
    harmful = PromptSet(
        tokenizer,
        texts.of("harmful", subset),
        batch_size,
        device,
        kernels,
        reuse_responses=options.reuse_responses,
        nearness=harmless,
    )
    prompts = getattr(texts.prompts.harmful, subset)
    judge = MarkerJudge(options.refusal_markers)
    return Scorer(harmless, harmful, prompts, judge, options.max_response_tokens, subset, options.kl_tokens)
