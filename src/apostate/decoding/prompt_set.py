"""`PromptSet`: the one way the rest of apostate runs prompts through a model.

A PromptSet is a fixed list of chat-templated texts for one model, and owns everything that
makes running them fast without changing a result:
- their tokens, split once into the chat-template prefix they share and each text's own
  suffix (prefix_cache: the prefix runs once per pass, not once per text);
- the layer replay of its passes (layer_replay): told which decoder layers an edit changed,
  it does not run the layers below the first of them, but replays what they computed before;
- for greedy responses, the pool of earlier responses it checks as drafts (response_pool,
  speculative), ranked by how near the model that wrote them is to the current one. Nearness
  is read from another PromptSet (`nearness`): its latest first-token log-probabilities at the
  base model's likeliest tokens;
- the model's CPU kernel choices (cpu_kernels), for the greedy head.
It offers what scoring needs: `first_token_logprobs` and `greedy_responses`; and, for a set
`continued` with known answers (the base model's), `answer_logprobs`: the distributions at the
answer's positions, teacher-forced in one pass (KL past the first token). Models
whose cache cannot be shared (sliding-window, recurrent layers) take the plain paths
(batching, generation), which give the same results slower.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from apostate.decoding.batching import last_position_logprobs, position_logprobs
from apostate.decoding.cpu_kernels import CpuKernels
from apostate.decoding.generation import generate_plain_ids, stop_ids
from apostate.decoding.layer_replay import LayerReplay, unchanged_layers
from apostate.decoding.prefix_cache import (
    PromptPasses,
    SharedPrefix,
    shared_prefix_logprobs,
    shared_prefix_position_logprobs,
)
from apostate.decoding.response_pool import ResponsePool
from apostate.decoding.speculative import DecodingLimits, speculative_greedy

SIGNATURE_TOKENS = 16  # a model is signed by its log-probabilities of the base's likeliest first tokens


class PromptSet:
    """Fixed chat texts run through a model: first-token log-probabilities, and greedy responses."""

    def __init__(
        self,
        tokenizer,
        texts: list[str],
        batch_size: int,
        device,
        kernels: CpuKernels | None = None,
        reuse_responses: bool = False,
        nearness: PromptSet | None = None,
    ):
        if not texts:
            raise ValueError("a PromptSet needs at least one text")
        self.tokenizer = tokenizer
        self.texts = texts
        self.batch_size = batch_size
        self.device = device
        self.kernels = kernels
        self.shared = SharedPrefix.of(tokenizer, texts)
        self.order = sorted(range(len(texts)), key=lambda i: len(self.shared.suffixes[i]))  # little padding
        # Passes given the layers an edit changed record the unchanged ones; later passes replay them.
        self.replays = {False: LayerReplay(with_cache=False), True: LayerReplay(with_cache=True)}
        self.pool = ResponsePool(len(texts)) if reuse_responses else None  # earlier responses, as drafts
        self.nearness = nearness
        self.base_top: torch.Tensor | None = None  # the base model's likeliest first tokens (signatures)
        self.base_signature: torch.Tensor | None = None
        self.latest: torch.Tensor | None = None  # log-probabilities of the last model measured
        self.answers: list[list[int]] | None = None  # set by `continued`: tokens appended to each text

    def continued(self, answers: list[list[int]]) -> PromptSet:
        """These texts, each followed by the tokens of its `answers` entry (a model's response):
        `answer_logprobs` reads the distributions at the response's positions."""
        other = PromptSet(self.tokenizer, self.texts, self.batch_size, self.device, self.kernels)
        suffixes = [suffix + answer for suffix, answer in zip(self.shared.suffixes, answers, strict=True)]
        other.shared = SharedPrefix(self.shared.prefix, suffixes)
        other.order = sorted(range(len(self.texts)), key=lambda i: len(other.shared.suffixes[i]))
        other.answers = answers
        return other

    def __len__(self) -> int:
        return len(self.texts)

    @torch.inference_mode()
    def first_token_logprobs(self, model, edited_layers: set[int] | None = None) -> torch.Tensor:
        """(texts, vocab) log-probabilities of each text's first response token, float32 on the CPU.

        `edited_layers`: the decoder layers where the model differs from the base model (None:
        unknown, every layer runs; an empty set: none differs). The layers below the first edited
        one are replayed from earlier passes where recorded, and recorded where not.
        """
        prefix_cache = self.shared.cache(model, self.device)
        if prefix_cache is None:
            logprobs = last_position_logprobs(model, self.tokenizer, self.texts, self.batch_size, self.device)
        else:
            logprobs = shared_prefix_logprobs(model, self.shared, prefix_cache, self._passes(False, edited_layers))
        self.latest = logprobs
        return logprobs

    @torch.inference_mode()
    def answer_logprobs(self, model, edited_layers: set[int] | None = None, reduce=None) -> list[torch.Tensor]:
        """For a `continued` set: per text, (answer tokens + 1, vocab) log-probabilities, the i-th
        row the distribution of the answer's i-th token given the text and the tokens before it
        (the last row: what follows the answer). One forward pass per batch; each text's row 0 is
        its `first_token_logprobs` (kept as the latest, for signatures). `reduce(i, rows)`: keep
        what it returns of text i's rows instead (no vocabulary per position is held)."""
        if self.answers is None:
            raise ValueError("answer_logprobs needs a continued PromptSet")
        counts = [len(answer) + 1 for answer in self.answers]
        first: list[torch.Tensor | None] = [None] * len(self.texts)

        def keep(index: int, rows: torch.Tensor) -> torch.Tensor:
            first[index] = rows[0].clone()
            return reduce(index, rows) if reduce else rows.clone()  # not a view that keeps the batch

        prefix_cache = self.shared.cache(model, self.device)
        if prefix_cache is None:
            rows = [self.shared.prefix + suffix for suffix in self.shared.suffixes]
            pad_id = self.tokenizer.pad_token_id
            result = position_logprobs(model, rows, counts, self.batch_size, pad_id, self.device, keep)
        else:
            passes = self._passes(False, edited_layers, positions=max(counts))
            result = shared_prefix_position_logprobs(model, self.shared, prefix_cache, passes, counts, keep)
        self.latest = torch.stack(first)
        return result

    def answer_token_logprobs(self, model, edited_layers: set[int] | None = None) -> list[torch.Tensor]:
        """For a `continued` set: per text, the log-probability of each of its answer's tokens."""
        return self.answer_logprobs(model, edited_layers, reduce=self._own_tokens)

    def _own_tokens(self, index: int, rows: torch.Tensor) -> torch.Tensor:
        tokens = torch.tensor(self.answers[index], dtype=torch.long)
        return rows[torch.arange(len(tokens)), tokens].clone()

    @torch.inference_mode()
    def greedy_responses(
        self,
        model,
        max_new_tokens: int,
        stop_when: Callable[[str], bool] | None = None,
        edited_layers: set[int] | None = None,
        advance: Callable[[int], None] | None = None,
        give_up: Callable[[int, list[int]], bool] | None = None,
    ) -> list[str | None]:
        """Each text's greedy response, at most `max_new_tokens` long, in text order.

        With `stop_when`, a response stops as soon as its text satisfies it; pass only a
        condition that more text can never undo (a refusal marker has appeared).
        `give_up(index, tokens)` is told each response as it is finished (without its end id);
        once it says True, generation stops and the responses not finished are None. (The plain
        path, for models whose cache cannot be shared, finishes them all.)
        """
        tokens = self.greedy_tokens(model, max_new_tokens, stop_when, edited_layers, advance, give_up)
        decode = self.tokenizer.decode
        return [None if response is None else decode(response, skip_special_tokens=True) for response in tokens]

    @torch.inference_mode()
    def greedy_tokens(
        self,
        model,
        max_new_tokens: int,
        stop_when: Callable[[str], bool] | None = None,
        edited_layers: set[int] | None = None,
        advance: Callable[[int], None] | None = None,
        give_up: Callable[[int, list[int]], bool] | None = None,
    ) -> list[list[int] | None]:
        """As greedy_responses, as token ids (without the end-of-sequence id)."""
        prefix_cache = self.shared.cache(model, self.device)
        if prefix_cache is None:
            args = (model, self.tokenizer, self.texts, max_new_tokens, self.batch_size, self.device)
            return generate_plain_ids(*args, stop_when, advance)
        ends = stop_ids(model, self.tokenizer)
        told = None if give_up is None else lambda index, known: give_up(index, _without_end(known, ends))
        if self.pool is not None:
            self.pool.begin(self.nearness.take_signature() if self.nearness else None)
        tokens = speculative_greedy(
            model,
            self.tokenizer,
            self.shared,
            prefix_cache,
            self._passes(True, edited_layers),
            DecodingLimits(max_new_tokens, ends, told),
            self.pool,
            stop_when,
            advance,
            self.kernels.greedy_head(model) if self.kernels else None,
        )
        if self.pool is not None:
            for index, response in tokens.items():
                self.pool.add(index, response)  # with its end id: a draft that ends there
        return [_without_end(tokens[index], ends) if index in tokens else None for index in range(len(self.texts))]

    def remember_base(self, logprobs: torch.Tensor | None = None, responses: list[list[int]] | None = None) -> None:
        """The base model's results on this set: its first-token log-probabilities (later models are
        signed relative to them), or its responses as token ids (the first drafts)."""
        if logprobs is not None:
            self.base_top = logprobs.topk(SIGNATURE_TOKENS, dim=-1).indices
            self.base_signature = self.signature(logprobs)
        if responses and self.pool is not None:
            self.pool.begin(self.nearness.base_signature if self.nearness else None)
            for index, tokens in enumerate(responses):
                self.pool.add(index, tokens)

    def latest_responses(self) -> list[list[int]]:
        """Each text's latest greedy response as token ids (empty without a response pool)."""
        return self.pool.newest() if self.pool is not None else []

    def signature(self, logprobs: torch.Tensor | None) -> torch.Tensor | None:
        """A model's log-probabilities of the base's likeliest first tokens: nearby models write alike."""
        if logprobs is None or self.base_top is None:
            return None
        return logprobs.gather(1, self.base_top)

    def take_signature(self) -> torch.Tensor | None:
        """The signature of the model measured last, once (a later model must be measured again)."""
        signature, self.latest = self.signature(self.latest), None
        return signature

    def _passes(self, with_cache: bool, edited_layers: set[int] | None, positions: int = 1) -> PromptPasses:
        unchanged = 0 if edited_layers is None else unchanged_layers(edited_layers)
        pad_id = self.tokenizer.pad_token_id
        replay = self.replays[with_cache]
        return PromptPasses(self.order, self.batch_size, pad_id, self.device, replay, unchanged, positions)


def _without_end(tokens: list[int], ends: set[int]) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] in ends else tokens
