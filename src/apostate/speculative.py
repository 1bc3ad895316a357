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

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .prefix_cache import SharedPrefix, batch_cache, left_padded, positions


class ResponsePool:
    """Earlier responses (token ids) per prompt, newest first, to draft from."""

    def __init__(self, size: int, per_prompt: int = 8):
        self.responses: list[list[list[int]]] = [[] for _ in range(size)]
        self.per_prompt = per_prompt

    def add(self, index: int, tokens: list[int]) -> None:
        pool = self.responses[index]
        if tokens in pool:
            pool.remove(tokens)
        pool.insert(0, tokens)
        del pool[self.per_prompt :]

    def draft(self, index: int, known: list[int], length: int) -> list[int]:
        """Up to `length` tokens that followed `known` in the newest response that starts with it."""
        n = len(known)
        for response in self.responses[index]:
            if len(response) > n and response[:n] == known:
                return response[n : n + length]
        return []


@dataclass
class _Sequence:
    index: int  # into the caller's texts
    known: list[int] = field(default_factory=list)  # response tokens known to be the model's greedy ones
    done: bool = False


@dataclass
class DecodingLimits:
    max_new_tokens: int
    stop_ids: set[int]  # end-of-sequence token ids
    first_draft: int  # draft length in the first pass (the whole response fits)
    later_draft: int  # draft length after a mismatch


@torch.inference_mode()
def speculative_greedy(
    model,
    tokenizer,
    shared: SharedPrefix,
    prefix_cache,
    indices: list[int],
    limits: DecodingLimits,
    pool: ResponsePool | None,
    decided: Callable[[str], bool] | None,
    device,
) -> dict[int, list[int]]:
    """Greedy response tokens for the texts at `indices` (one batch), keyed by index."""
    sequences = [_Sequence(index) for index in indices]
    cache = batch_cache(prefix_cache, len(indices))
    ids, chunk_mask = left_padded([shared.suffixes[i] for i in indices], tokenizer.pad_token_id, device)
    mask = torch.ones((len(indices), len(shared.prefix)), dtype=torch.long, device=device)  # grows with the cache
    pending: list[list[int]] = [[] for _ in sequences]  # the known token not yet in the cache
    results: dict[int, list[int]] = {}
    first = True
    while sequences:
        length = limits.first_draft if first else limits.later_draft
        drafts = [_draft(pool, s, min(length, limits.max_new_tokens - len(s.known) - 1)) for s in sequences]
        width = max(len(d) for d in drafts)
        if not first:
            ids, chunk_mask = left_padded([p[-1:] for p in pending], tokenizer.pad_token_id, device)
        draft_ids, draft_mask = _right_padded(drafts, width, tokenizer.pad_token_id, device)
        ids, chunk_mask = torch.cat([ids, draft_ids], 1), torch.cat([chunk_mask, draft_mask], 1)
        mask = torch.cat([mask, chunk_mask], 1)
        output = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions(mask, ids.shape[1]),
            cache=cache,
            use_cache=True,
            logits_to_keep=width + 1,
        )
        predicted = output.logits.argmax(-1).tolist()  # row r, column j: the model's token after draft[:j]
        for row, (sequence, draft) in enumerate(zip(sequences, drafts, strict=True)):
            accepted = _accepted(draft, predicted[row])
            mask[row, mask.shape[1] - width + accepted :] = 0  # rejected draft tokens become invisible
            sequence.known += draft[:accepted] + [predicted[row][accepted]]
            pending[row] = sequence.known[-1:]
            _finish(sequence, tokenizer, limits, decided)
        first = False
        results.update({s.index: s.known for s in sequences if s.done})
        keep = [row for row, s in enumerate(sequences) if not s.done]
        if keep and len(keep) < len(sequences):
            cache.batch_select_indices(torch.tensor(keep, device=device))
            mask = mask[keep]
        sequences = [sequences[row] for row in keep]
        pending = [pending[row] for row in keep]
    return results


def _draft(pool: ResponsePool | None, sequence: _Sequence, length: int) -> list[int]:
    if pool is None or length <= 0:
        return []
    return pool.draft(sequence.index, sequence.known, length)


def _accepted(draft: list[int], predicted: list[int]) -> int:
    count = 0
    while count < len(draft) and draft[count] == predicted[count]:
        count += 1
    return count


def _right_padded(rows: list[list[int]], width: int, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[index, : len(row)] = 1
    return ids.to(device), mask.to(device)


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
