"""Greedy generation that checks earlier responses as drafts; the output is plain greedy decoding.

Trials of one study edit the model a little at a time, so a prompt's greedy response often
repeats one from an earlier trial, or runs along one for a while. Each sequence proposes a
draft, the continuation of the newest earlier response that agrees with everything known so
far. One forward pass scores all draft tokens at once; the longest prefix that the model
itself would have produced is kept, plus the model's own next token (speculative decoding
with lookup drafts and greedy acceptance: Leviathan et al. 2023, arXiv:2211.17192; Saxena
2023, "prompt lookup decoding"). Without drafts it is ordinary greedy decoding.

Rejected draft tokens stay in the key/value cache with their attention-mask entries set to
zero; positions count unmasked entries only (see prefix_cache), so every kept token is
predicted from exactly the tokens plain decoding would have seen. Finished sequences leave
the batch, so the rest decode faster.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .prefix_cache import SharedPrefix, batch_cache, positions


@dataclass
class DraftStats:
    """How well drafting paid: forward passes, and draft tokens offered and kept."""

    passes: int = 0
    proposed: int = 0
    accepted: int = 0
    cut: int = 0  # drafts rejected before their end
    generated: int = 0

    def acceptance(self) -> float:
        """Chance that a draft token is right given the ones before it were (geometric model)."""
        return (self.accepted + 1) / (self.accepted + self.cut + 2)


class PassCost:
    """Seconds per forward pass as a + b * (tokens in the pass), fitted to the passes so far.

    Drafting pays where a pass of many tokens costs little more than one of a token per row,
    which holds on GPUs and much less on CPUs; the fit tells which this machine is.
    """

    def __init__(self, history: int = 256):
        self.samples: list[tuple[int, float]] = []
        self.history = history

    def add(self, tokens: int, seconds: float) -> None:
        self.samples.append((tokens, seconds))
        del self.samples[: -self.history]

    def coefficients(self) -> tuple[float, float]:
        if len({tokens for tokens, _ in self.samples}) >= 3:
            x = torch.tensor([[1.0, tokens] for tokens, _ in self.samples], dtype=torch.float64)
            y = torch.tensor([seconds for _, seconds in self.samples], dtype=torch.float64)
            a, b = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1).tolist()
            if a > 0 and b > 0:
                return a, b
        return 1.0, 0.015  # a 2-core CPU on a 0.5B model: 16 rows x 8 tokens cost 2.3 times 16 x 1

    def __str__(self) -> str:
        kept = self.accepted / self.proposed if self.proposed else 0.0
        return (f"{self.generated} tokens in {self.passes} passes; "
                f"draft tokens kept {self.accepted}/{self.proposed} ({kept:.0%})")  # fmt: skip


class ResponsePool:
    """Earlier responses (token ids) per prompt, to draft from.

    Each response is tagged with a signature of the model that wrote it (its first-token
    log-probabilities on the KL prompts, see Scorer). Drafts come first from the responses
    of the model nearest to the current one: nearby trials write nearly the same text.
    Without signatures, newest first.
    """

    def __init__(self, size: int, per_prompt: int = 8):
        self.responses: list[list[tuple[int, list[int]]]] = [[] for _ in range(size)]  # (model, tokens)
        self.per_prompt = per_prompt
        self.signatures: list[torch.Tensor | None] = []
        self.rank: dict[int, float] = {}  # model -> distance to the current one
        self.stats = DraftStats()
        self.cost = PassCost()

    def begin(self, signature: torch.Tensor | None = None) -> None:
        """A new model is about to generate: rank the earlier ones by nearness to it."""
        self.signatures.append(signature)
        current = len(self.signatures) - 1
        self.rank = {
            model: (float((signature - other).norm()) if signature is not None and other is not None else 0.0)
            - model * 1e-9  # ties: the newest first
            for model, other in enumerate(self.signatures)
        }
        self.rank[current] = float("-inf")

    def add(self, index: int, tokens: list[int]) -> None:
        if not self.signatures:
            self.begin()
        pool = [(model, old) for model, old in self.responses[index] if old != tokens]
        self.responses[index] = [(len(self.signatures) - 1, tokens), *pool][: self.per_prompt]

    def _ranked(self, index: int) -> list[list[int]]:
        entries = sorted(self.responses[index], key=lambda entry: self.rank.get(entry[0], 0.0))
        return [tokens for _, tokens in entries]

    def draft(self, index: int, known: list[int], length: int, anchor: int = 3) -> list[int]:
        """Up to `length` tokens to guess what follows `known`.

        From the newest response that starts with `known`; failing that (the responses
        diverged), from where the last `anchor` known tokens occur in a response, nearest
        the same position, as in prompt lookup decoding.
        """
        n = len(known)
        responses = self._ranked(index)
        for response in responses:
            if len(response) > n and response[:n] == known:
                return response[n : n + length]
        if n < anchor:
            return []
        tail, best, best_shift = known[-anchor:], None, None
        for response in responses:
            for end in range(anchor, len(response)):
                if response[end - anchor : end] == tail and (best_shift is None or abs(end - n) < best_shift):
                    best, best_shift = response[end : end + length], abs(end - n)
        return best or []


@dataclass
class _Sequence:
    index: int  # into the caller's texts
    head: list[int]  # tokens to feed next before the draft: the prompt's own tokens, then the last known one
    known: list[int] = field(default_factory=list)  # response tokens known to be the model's greedy ones
    done: bool = False


@dataclass
class DecodingLimits:
    max_new_tokens: int
    stop_ids: set[int]  # end-of-sequence token ids


@torch.inference_mode()
def speculative_greedy(
    model,
    tokenizer,
    shared: SharedPrefix,
    prefix_cache,
    order: list[int],
    window: int,
    limits: DecodingLimits,
    pool: ResponsePool | None,
    decided: Callable[[str], bool] | None,
    device,
    advance: Callable[[int], None] | None = None,
) -> dict[int, list[int]]:
    """Greedy response tokens for the texts at `order`, keyed by index; at most `window` at a time.

    A finished sequence leaves the batch; once half the window is free, the next prompts join
    (their prompt tokens go through in the same pass as the others' drafts), so the passes stay
    full instead of a few slow sequences holding up a whole batch.
    """
    waiting = [_Sequence(index, list(shared.suffixes[index])) for index in order]
    waiting.reverse()
    active: list[_Sequence] = []
    batch = _Batch(prefix_cache, len(shared.prefix), device)
    results: dict[int, list[int]] = {}
    stats = pool.stats if pool is not None else DraftStats()
    while waiting or active:
        if waiting and len(active) <= window // 2:
            joining = [waiting.pop() for _ in range(min(window - len(active), len(waiting)))]
            batch.add_rows(len(joining))
            active += joining
        drafts = [_draft(pool, s, limits.max_new_tokens - len(s.known) - 1) for s in active]
        if pool is not None:
            width = _best_width(drafts, max(len(s.head) for s in active), stats.acceptance(), pool.cost)
            drafts = [draft[:width] for draft in drafts]
        start = time.perf_counter()
        predicted = batch.step(model, [s.head for s in active], drafts, tokenizer.pad_token_id)
        if pool is not None:
            pool.cost.add(batch.mask.shape[0] * (batch.anchor + batch.draft_width), time.perf_counter() - start)
        stats.passes += 1
        for row, (sequence, draft) in enumerate(zip(active, drafts, strict=True)):
            accepted = _accepted(draft, predicted[row])
            stats.proposed += len(draft)
            stats.accepted += accepted
            stats.cut += accepted < len(draft)
            batch.hide_rejected(row, len(draft), accepted)
            sequence.known += draft[:accepted] + [predicted[row][accepted]]
            sequence.head = sequence.known[-1:]
            _finish(sequence, tokenizer, limits, decided)
        finished = [s for s in active if s.done]
        if finished:
            results.update({s.index: s.known for s in finished})
            stats.generated += sum(len(s.known) for s in finished)
            if advance:
                advance(len(finished))
            batch.keep([row for row, s in enumerate(active) if not s.done])
            active = [s for s in active if not s.done]
    return results


class _Batch:
    """The key/value cache and attention mask of the sequences in flight, row for row."""

    def __init__(self, prefix_cache, prefix_length: int, device):
        self.prefix_cache = prefix_cache
        self.prefix_length = prefix_length
        self.device = device
        self.cache = None
        self.mask = torch.zeros((0, prefix_length), dtype=torch.long, device=device)
        self.draft_width = 0
        self.anchor = 0

    def add_rows(self, count: int) -> None:
        """New rows hold the shared prefix, right-aligned to the slots the others already have."""
        if self.cache is None or self.cache.get_seq_length() == 0:
            self.cache = batch_cache(self.prefix_cache, count)
            self.mask = torch.ones((count, self.prefix_length), dtype=torch.long, device=self.device)
            return
        gap = self.mask.shape[1] - self.prefix_length
        for layer, prefix_layer in zip(self.cache.layers, self._prefix_layers(), strict=True):
            layer.keys = torch.cat([layer.keys, _new_rows(layer.keys, prefix_layer[0], count, gap)])
            layer.values = torch.cat([layer.values, _new_rows(layer.values, prefix_layer[1], count, gap)])
        rows = torch.cat([torch.zeros((count, gap), dtype=torch.long), torch.ones((count, self.prefix_length),
                          dtype=torch.long)], 1).to(self.device)  # fmt: skip
        self.mask = torch.cat([self.mask, rows])

    def _prefix_layers(self):
        if self.prefix_length == 0:
            return [(None, None)] * len(self.cache.layers)
        return [(layer.keys, layer.values) for layer in self.prefix_cache.layers]

    def step(self, model, heads: list[list[int]], drafts: list[list[int]], pad_id: int) -> list[list[int]]:
        """One forward pass over each row's head and draft; row r, column j: the model's token after draft[:j]."""
        anchor = self.anchor = max(len(head) for head in heads)  # right-aligned: last tokens share a column
        self.draft_width = max(len(draft) for draft in drafts)
        width = anchor + self.draft_width
        ids = torch.full((len(heads), width), pad_id, dtype=torch.long)
        chunk_mask = torch.zeros((len(heads), width), dtype=torch.long)
        for row, (head, draft) in enumerate(zip(heads, drafts, strict=True)):
            tokens = head + draft
            ids[row, anchor - len(head) : anchor - len(head) + len(tokens)] = torch.tensor(tokens)
            chunk_mask[row, anchor - len(head) : anchor - len(head) + len(tokens)] = 1
        ids, chunk_mask = ids.to(self.device), chunk_mask.to(self.device)
        self.mask = torch.cat([self.mask, chunk_mask], 1)
        output = model(
            input_ids=ids,
            attention_mask=self.mask,
            position_ids=positions(self.mask, width),
            cache=self.cache,
            use_cache=True,
            logits_to_keep=self.draft_width + 1,
        )
        self.cache = output.cache
        return output.logits.argmax(-1).tolist()

    def hide_rejected(self, row: int, draft_length: int, accepted: int) -> None:
        """Rejected draft tokens stay in the cache, masked: later tokens never see them."""
        first_draft_slot = self.mask.shape[1] - self.draft_width
        self.mask[row, first_draft_slot + accepted : first_draft_slot + draft_length] = 0

    def keep(self, rows: list[int]) -> None:
        if rows:
            self.cache.batch_select_indices(torch.tensor(rows, device=self.device))
            self.mask = self.mask[rows]
        else:
            self.cache, self.mask = None, self.mask[:0, : self.prefix_length]


def _new_rows(existing: torch.Tensor, prefix: torch.Tensor | None, count: int, gap: int) -> torch.Tensor:
    """(count, heads, slots, dim): masked zeros, then the prefix's keys or values."""
    batch, heads, _, dim = existing.shape
    parts = [existing.new_zeros((count, heads, gap, dim))]
    if prefix is not None:
        parts.append(prefix.expand(count, -1, -1, -1))
    return torch.cat(parts, 2)


def _best_width(drafts: list[list[int]], anchor: int, acceptance: float, cost: PassCost) -> int:
    """The draft width that yields the most expected tokens per second in this pass."""
    a, b = cost.coefficients()
    rows, longest = len(drafts), max(len(draft) for draft in drafts)
    best, best_rate = 0, 0.0
    for width in sorted({0, 1, 2, 4, 8, 16, 32, longest}):
        if width > longest:
            continue
        # Expected tokens: each row's own next token, plus draft tokens until the first wrong one.
        expected = sum(1 + sum(acceptance**k for k in range(1, min(width, len(draft)) + 1)) for draft in drafts)
        rate = expected / (a + b * rows * (anchor + width))
        if rate > best_rate:
            best, best_rate = width, rate
    return best


def _draft(pool: ResponsePool | None, sequence: _Sequence, length: int) -> list[int]:
    if pool is None or length <= 0:
        return []
    return pool.draft(sequence.index, sequence.known, length)


def _accepted(draft: list[int], predicted: list[int]) -> int:
    count = 0
    while count < len(draft) and draft[count] == predicted[count]:
        count += 1
    return count


def _finish(sequence: _Sequence, tokenizer, limits: DecodingLimits, decided) -> None:
    """Cut at an end-of-sequence token or the length limit; mark done if nothing more is needed."""
    for position, token in enumerate(sequence.known):
        if token in limits.stop_ids:
            sequence.known = sequence.known[: position + 1]
            sequence.done = True
            return
    if len(sequence.known) >= limits.max_new_tokens:
        sequence.known = sequence.known[: limits.max_new_tokens]
        sequence.done = True
    elif decided is not None and decided(tokenizer.decode(sequence.known, skip_special_tokens=True)):
        sequence.done = True
