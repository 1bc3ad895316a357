"""How far a model moved: KL divergence of first-token distributions, and refusal counts."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..decoding.batching import last_position_logprobs
from ..decoding.generation import generate
from ..decoding.layer_replay import LayerReplay
from ..decoding.prefix_cache import last_position_logprobs_shared
from ..decoding.response_pool import ResponsePool
from ..progress import track
from .refusals import RefusalDetector

SIGNATURE_TOKENS = 16


@dataclass(frozen=True)
class Scores:
    kl: float
    refusals: int
    total: int

    @property
    def refusal_rate(self) -> float:
        return self.refusals / self.total if self.total else 0.0


@dataclass
class ScoringSetup:
    """What scoring needs besides the prompts."""

    tokenizer: object
    device: torch.device
    batch_size: int
    max_new_tokens: int
    detector: RefusalDetector
    reuse_responses: bool = True  # draft from earlier responses (exact; see speculative.py)


class Scorer:
    """Scores a model on fixed harmless/harmful texts against the base model's first-token distributions."""

    def __init__(self, setup: ScoringSetup, harmless_texts: list[str], harmful_texts: list[str], label: str):
        self.setup = setup
        self.harmless_texts = harmless_texts
        self.harmful_texts = harmful_texts
        self.label = label
        self.base_logprobs: torch.Tensor | None = None
        self.pool = ResponsePool(len(harmful_texts)) if setup.reuse_responses else None
        self._signature: torch.Tensor | None = None  # of the model whose KL was measured last
        # Recorded by passes given unchanged layers (trials), replayed by later ones.
        self.harmless_replay = LayerReplay(with_cache=False)
        self.harmful_replay = LayerReplay(with_cache=True)

    def record_base(self, model) -> Scores:
        """Measure the unedited model: its distributions become the KL reference."""
        self.base_logprobs = self.logprobs(model)
        self._signature = self._signature_of(self.base_logprobs)
        return Scores(0.0, self.count_refusals(model), len(self.harmful_texts))

    def base_responses(self) -> list[list[int]]:
        """The token ids the base model answered the harmful prompts with (after `record_base`)."""
        return self.pool.newest() if self.pool is not None else []

    def resume_from_base(self, base_logprobs: torch.Tensor, base_responses: list[list[int]]) -> None:
        """Take the base model's scores measured earlier: its distributions, and its responses as drafts."""
        self.base_logprobs = base_logprobs
        if self.pool is not None and base_responses:
            self.pool.begin(self._signature_of(base_logprobs))
            for index, tokens in enumerate(base_responses):
                self.pool.add(index, tokens)

    def _signature_of(self, logprobs: torch.Tensor) -> torch.Tensor:
        """A model's log-probabilities of the base's likeliest first tokens: nearby models write alike."""
        top = self.base_logprobs.topk(SIGNATURE_TOKENS, dim=-1).indices
        return logprobs.gather(1, top)

    def logprobs(self, model, unchanged: int = 0) -> torch.Tensor:
        s = self.setup
        return first_token_logprobs(
            model, s.tokenizer, self.harmless_texts, s.batch_size, s.device, self.harmless_replay, unchanged
        )

    def kl(self, model, unchanged: int = 0) -> float:
        """KL(base ‖ model), averaged over the harmless prompts.

        `unchanged`: how many leading decoder layers are known to equal the base model's;
        their work on the prompts is replayed from an earlier pass (see layer_replay).
        """
        logprobs = self.logprobs(model, unchanged)
        self._signature = self._signature_of(logprobs)
        return kl_divergence(self.base_logprobs, logprobs)

    def count_refusals(self, model, unchanged: int = 0) -> int:
        return sum(self.refusal_flags(model, unchanged=unchanged))

    def refusal_flags(self, model, early_stop: bool = True, unchanged: int = 0) -> list[bool]:
        s = self.setup
        if self.pool is not None:
            self.pool.begin(self._signature)
            self._signature = None
        with track(f"{self.label}: refusals", len(self.harmful_texts)) as advance:
            responses = generate(
                model,
                s.tokenizer,
                self.harmful_texts,
                s.max_new_tokens,
                s.batch_size,
                s.device,
                stop_when=s.detector.decided if early_stop else None,
                advance=advance,
                pool=self.pool,
                replay=self.harmful_replay,
                unchanged=unchanged,
            )
        return [s.detector.is_refusal(response) for response in responses]

    def score(self, model) -> Scores:
        return Scores(self.kl(model), self.count_refusals(model), len(self.harmful_texts))


def first_token_logprobs(
    model, tokenizer, texts: list[str], batch_size: int, device, replay: LayerReplay | None = None, unchanged: int = 0
) -> torch.Tensor:
    """(len(texts), vocab) log-probabilities, computing the shared chat-template prefix once where possible
    (and, with a `replay`, skipping the first `unchanged` layers: see layer_replay)."""
    shared = last_position_logprobs_shared(model, tokenizer, texts, batch_size, device, replay, unchanged)
    return shared if shared is not None else last_position_logprobs(model, tokenizer, texts, batch_size, device)


def kl_divergence(base_logprobs: torch.Tensor, logprobs: torch.Tensor) -> float:
    return F.kl_div(logprobs, base_logprobs, reduction="batchmean", log_target=True).item()
