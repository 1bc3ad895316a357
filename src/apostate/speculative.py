"""Greedy generation that checks earlier responses as drafts; the output is plain greedy decoding.

Trials of one study edit the model a little at a time, so a prompt's greedy response often
repeats one from an earlier trial, or runs along one for a while. Each sequence proposes a
draft, the continuation of an earlier response (the nearest earlier model's first, see
response_pool) that agrees with everything known so far. One forward pass scores all draft tokens at once; the longest prefix that the model
itself would have produced is kept, plus the model's own next token (speculative decoding
with lookup drafts and greedy acceptance: Leviathan et al. 2023, arXiv:2211.17192; Saxena
2023, "prompt lookup decoding"). Without drafts it is ordinary greedy decoding.

Prompts run first, in batches of similar length; decoding passes then carry only response
tokens. Rejected draft tokens stay in the key/value cache with their attention-mask entries
set to zero; positions count unmasked entries only (see prefix_cache), so every kept token
is predicted from exactly the tokens plain decoding would have seen. Finished sequences
leave the batch and waiting prompts take their place at once.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from .greedy_head import GreedyHead
from .prefix_cache import PromptPasses, PromptState, SharedPrefix, positions, prefill
from .response_pool import LOOKUP, DraftStats, ResponsePool, best_width


@dataclass
class _Sequence:
    index: int  # into the caller's texts
    known: list[int]  # response tokens known to be the model's greedy ones
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
    passes: PromptPasses,
    limits: DecodingLimits,
    pool: ResponsePool | None,
    decided: Callable[[str], bool] | None,
    advance: Callable[[int], None] | None = None,
) -> dict[int, list[int]]:
    """Greedy response tokens for the texts at `passes.order`, keyed by index; `passes.batch_size` at a time.

    All prompts run first, a batch at a time in their order (sorted by length, so little
    padding), which gives each its first token and its keys and values. Decoding passes then
    carry one token and a draft per row: a finished sequence leaves, and a waiting prompt
    takes its row at once by copying its keys and values in, so the passes stay full.
    """
    prompts = prefill(model, shared, prefix_cache, passes)
    window = passes.batch_size
    waiting, results = _first_tokens(prompts, passes.order, pool, limits, tokenizer, decided)
    if advance and results:
        advance(len(results))
    active: list[_Sequence] = []
    batch = _Batch(passes.device, GreedyHead.of(model))
    stats = pool.stats if pool is not None else DraftStats()
    while waiting or active:
        if waiting and len(active) < window:
            joining = [waiting.pop() for _ in range(min(window - len(active), len(waiting)))]
            batch.add_rows([prompts.pop(s.index) for s in joining])
            active += joining
        proposals = [_propose(pool, s, limits.max_new_tokens - len(s.known) - 1) for s in active]
        drafts, kinds = [draft for draft, _ in proposals], [kind for _, kind in proposals]
        if pool is not None:
            width = best_width(drafts, 1, [stats.acceptance(kind) for kind in kinds], pool.cost)
            drafts = [draft[:width] for draft in drafts]
        start = time.perf_counter()
        predicted = batch.step(model, [s.known[-1] for s in active], drafts, tokenizer.pad_token_id)
        if pool is not None:
            pool.cost.add(batch.mask.shape[0] * (1 + batch.draft_width), time.perf_counter() - start)
        stats.passes += 1
        for row, (sequence, draft) in enumerate(zip(active, drafts, strict=True)):
            accepted = _accepted(draft, predicted[row])
            stats.record(kinds[row], len(draft), accepted)
            batch.hide_rejected(row, len(draft), accepted)
            sequence.known += draft[:accepted] + [predicted[row][accepted]]
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


def _first_tokens(prompts: dict[int, PromptState], order: list[int], pool, limits: DecodingLimits, tokenizer, decided):
    """(waiting sequences, last to start first; responses already finished by their first token)."""
    if pool is not None:  # longest expected response first: the window ends on short ones, not a long tail
        order = sorted(order, key=lambda index: pool.expected_length(index, limits.max_new_tokens), reverse=True)
    waiting, results = [], {}
    for index in reversed(order):
        sequence = _Sequence(index, [prompts[index].first_token])
        _finish(sequence, tokenizer, limits, decided)
        if sequence.done:
            results[index] = sequence.known
        else:
            waiting.append(sequence)
    return waiting, results


class _Batch:
    """The key/value cache and attention mask of the sequences in flight, row for row."""

    def __init__(self, device, head: GreedyHead | None):
        self.device = device
        self.head = head
        self.cache: DynamicCache | None = None
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=device)
        self.draft_width = 0

    def add_rows(self, prompts: list[PromptState]) -> None:
        """Each new row holds its prompt's keys and values, right-aligned: last tokens share a column."""
        width = max(self.mask.shape[1], *(p.length for p in prompts))
        self._widen(width)
        rows = [F.pad(torch.ones(p.length, dtype=torch.long), (width - p.length, 0)) for p in prompts]
        self.mask = torch.cat([self.mask, torch.stack(rows).to(self.device)])
        layers = [
            (torch.stack([_left_slots(p.keys[i], width - p.length) for p in prompts]),
             torch.stack([_left_slots(p.values[i], width - p.length) for p in prompts]))
            for i in range(len(prompts[0].keys))
        ]  # fmt: skip
        if self.cache is None:
            self.cache = DynamicCache(ddp_cache_data=layers)
            return
        for layer, (keys, values) in zip(self.cache.layers, layers, strict=True):
            layer.keys = torch.cat([layer.keys, keys])
            layer.values = torch.cat([layer.values, values])

    def _widen(self, width: int) -> None:
        """Masked empty slots on the left of every row, so that a longer prompt fits."""
        extra = width - self.mask.shape[1]
        if extra <= 0:
            return
        self.mask = F.pad(self.mask, (extra, 0))
        if self.cache is not None:
            for layer in self.cache.layers:
                layer.keys, layer.values = _left_slots(layer.keys, extra), _left_slots(layer.values, extra)

    def step(self, model, last_tokens: list[int], drafts: list[list[int]], pad_id: int) -> list[list[int]]:
        """One forward pass over each row's last token and draft; row r, column j: the model's token after draft[:j]."""
        self.draft_width = max(len(draft) for draft in drafts)
        width = 1 + self.draft_width
        ids = torch.full((len(last_tokens), width), pad_id, dtype=torch.long)
        chunk_mask = torch.zeros((len(last_tokens), width), dtype=torch.long)
        for row, (last, draft) in enumerate(zip(last_tokens, drafts, strict=True)):
            ids[row, : 1 + len(draft)] = torch.tensor([last, *draft])
            chunk_mask[row, : 1 + len(draft)] = 1
        ids, chunk_mask = ids.to(self.device), chunk_mask.to(self.device)
        self.mask = torch.cat([self.mask, chunk_mask], 1)
        inputs = dict(input_ids=ids, attention_mask=self.mask, position_ids=positions(self.mask, width))
        projection = model.get_output_embeddings()
        if projection is None:  # no separate output projection to call: the model's own pass
            output = model(**inputs, cache=self.cache, use_cache=True, logits_to_keep=width)
            self.cache = output.cache
            return output.logits.argmax(-1).tolist()
        output = model.get_decoder()(**inputs, cache=self.cache, use_cache=True)
        self.cache = output.cache
        # Only each row's last token and draft need a greedy token, so the output projection
        # (the largest product of the pass) skips the padding after shorter drafts. Scaling or
        # capping that a model applies to its logits afterwards is monotone: same argmax.
        real = chunk_mask.bool()
        hidden = output.last_hidden_state[:, -width:][real]
        chosen = self.head.tokens(hidden) if self.head is not None else projection(hidden).argmax(-1)
        tokens = torch.full((len(last_tokens), width), pad_id, dtype=torch.long, device=self.device)
        tokens[real] = chosen
        return tokens.tolist()

    def hide_rejected(self, row: int, draft_length: int, accepted: int) -> None:
        """Rejected draft tokens stay in the cache, masked: later tokens never see them."""
        first_draft_slot = self.mask.shape[1] - self.draft_width
        self.mask[row, first_draft_slot + accepted : first_draft_slot + draft_length] = 0

    def keep(self, rows: list[int]) -> None:
        if rows:
            self.cache.batch_select_indices(torch.tensor(rows, device=self.device))
            self.mask = self.mask[rows]
        else:
            self.cache, self.mask = None, self.mask[:0, :0]


def _left_slots(tensor: torch.Tensor, count: int) -> torch.Tensor:
    """`count` zero slots before the others ((..., slots, head dim) tensors)."""
    return F.pad(tensor, (0, 0, count, 0))


def _propose(pool: ResponsePool | None, sequence: _Sequence, length: int) -> tuple[list[int], str]:
    if pool is None or length <= 0:
        return [], LOOKUP
    return pool.propose(sequence.index, sequence.known, length)


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
