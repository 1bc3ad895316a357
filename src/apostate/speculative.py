"""Greedy generation that checks earlier responses as drafts; the output is plain greedy decoding.

Trials of one study edit the model a little at a time, so a prompt's greedy response often
repeats one from an earlier trial, or runs along one for a while. Each sequence proposes a
draft, the continuation of an earlier response (the nearest earlier model's first, see
response_pool) that agrees with everything known so far. One forward pass scores all draft tokens at once; the longest prefix that the model
itself would have produced is kept, plus the model's own next token (speculative decoding
with lookup drafts and greedy acceptance: Leviathan et al. 2023, arXiv:2211.17192; Saxena
2023, "prompt lookup decoding"). Without drafts it is ordinary greedy decoding.

Rejected draft tokens stay in the key/value cache with their attention-mask entries set to
zero; positions count unmasked entries only (see prefix_cache), so every kept token is
predicted from exactly the tokens plain decoding would have seen. Finished sequences leave
the batch and waiting prompts take their place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .prefix_cache import SharedPrefix, batch_cache, positions
from .response_pool import DraftStats, ResponsePool, best_width


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
            width = best_width(drafts, max(len(s.head) for s in active), stats.acceptance(), pool.cost)
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
