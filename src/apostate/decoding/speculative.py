"""Greedy generation that checks earlier responses as drafts; the output is plain greedy decoding.

Trials of one study edit the model a little at a time, so a prompt's greedy response often
repeats one from an earlier trial, or runs along one for a while. Each sequence proposes a
draft, the continuation of an earlier response (the nearest earlier model's first, see
response_pool) that agrees with everything known so far. One forward pass scores all draft tokens at once; the longest prefix that the model
itself would have produced is kept, plus the model's own next token (speculative decoding
with lookup drafts and greedy acceptance: Leviathan et al. 2023, arXiv:2211.17192; Saxena
2023, "prompt lookup decoding"). Without drafts it is ordinary greedy decoding.

Prompts run first, in batches of similar length; decoding passes then carry only response
tokens. After each pass a sequence keeps the keys and values of its accepted tokens only, so
every kept token is predicted from exactly the tokens plain decoding would have seen. Each
pass takes the sequences it carries afresh (see speculative_greedy), at most batch size.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from apostate.decoding.greedy_head import GreedyHead
from apostate.decoding.prefix_cache import PromptPasses, PromptState, SharedPrefix, positions, prefill
from apostate.decoding.real_positions import on_real_positions, position_wise_modules
from apostate.decoding.response_pool import LOOKUP, DraftStats, ResponsePool, best_width


@dataclass
class _Sequence:
    index: int  # into the caller's texts
    known: list[int]  # response tokens known to be the model's greedy ones
    keys: list[torch.Tensor]  # per layer (heads, slots, head dim): the prompt and known[:-1]
    values: list[torch.Tensor]
    done: bool = False

    @property
    def slots(self) -> int:
        return self.keys[0].shape[1]


@dataclass
class DecodingLimits:
    max_new_tokens: int
    stop_ids: set[int]  # end-of-sequence token ids
    # told each finished response (index, tokens); True: stop, the unfinished ones are left out
    give_up: Callable[[int, list[int]], bool] | None = None


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
    head: GreedyHead | None = None,
) -> dict[int, list[int]]:
    """Greedy response tokens for the texts at `passes.order`, keyed by index; `passes.batch_size` at a time
    (only the finished ones, where `limits.give_up` stopped it).

    All prompts run first, a batch at a time in their order (sorted by length, so little
    padding), which gives each its first token and its keys and values. Each decoding pass
    then carries the `batch_size` least advanced unfinished sequences, one token and a draft
    each. Which sequences need the most passes is not known in advance (it depends on how far
    their drafts hold), so the ones with the most tokens left go first; then the last passes
    do not carry a few stragglers alone (longest processing time first). On the demo model's
    first five side-by-side trials this took 196 passes instead of 257 (starting the longest
    expected responses first and keeping each in the batch until it was done).

    `head`: greedy tokens from a screened output projection (greedy_head) instead of the full one.
    """
    prompts = prefill(model, shared, prefix_cache, passes)
    running, results = _first_tokens(prompts, passes.order, limits, tokenizer, decided)
    if advance and results:
        advance(len(results))
    if _gives_up(limits, results.items()):
        return results
    decoder = _Decoder(passes.device, head, position_wise_modules(model), tokenizer.pad_token_id)
    stats = pool.stats if pool is not None else DraftStats()
    while running:
        chosen = least_advanced(running, passes.batch_size)
        proposals = [_propose(pool, s, limits.max_new_tokens - len(s.known) - 1) for s in chosen]
        drafts, kinds = [draft for draft, _ in proposals], [kind for _, kind in proposals]
        if pool is not None:
            width = best_width(drafts, 1, [stats.acceptance(kind) for kind in kinds], pool.cost)
            drafts = [draft[:width] for draft in drafts]
        start = time.perf_counter()
        predicted = decoder.step(model, chosen, drafts)
        if pool is not None:
            pool.cost.add(len(chosen) * (1 + max(map(len, drafts))), time.perf_counter() - start)
        stats.passes += 1
        for row, (sequence, draft) in enumerate(zip(chosen, drafts, strict=True)):
            accepted = _accepted(draft, predicted[row])
            stats.record(kinds[row], len(draft), accepted)
            sequence.known += draft[:accepted] + [predicted[row][accepted]]
            _finish(sequence, tokenizer, limits, decided)
            if not sequence.done:
                decoder.keep(row, sequence, 1 + accepted)  # the last token and the accepted draft; not rejected ones
        finished = [s for s in chosen if s.done]
        running = [s for s in running if not s.done]
        if finished and _keep_finished(finished, results, stats, advance, limits):
            break
    return results


def _keep_finished(finished: list[_Sequence], results: dict, stats: DraftStats, advance, limits) -> bool:
    """Keep the finished sequences' responses; whether the caller gives up now (limits.give_up)."""
    results.update({s.index: s.known for s in finished})
    stats.generated += sum(len(s.known) for s in finished)
    if advance:
        advance(len(finished))
    return _gives_up(limits, [(s.index, s.known) for s in finished])


def _gives_up(limits: DecodingLimits, finished) -> bool:
    """Whether the caller stops decoding, told every newly finished (index, tokens) response."""
    if limits.give_up is None:
        return False
    return any([limits.give_up(index, tokens) for index, tokens in finished])  # a list: each is told


def least_advanced(running: list[_Sequence], count: int) -> list[_Sequence]:
    """The `count` running sequences with the fewest known tokens; prompt order among equals."""
    return sorted(running, key=lambda sequence: len(sequence.known))[:count]


def _first_tokens(prompts: dict[int, PromptState], order: list[int], limits: DecodingLimits, tokenizer, decided):
    """(sequences still running, in prompt order; responses already finished by their first token)."""
    running, results = [], {}
    for index in order:
        prompt = prompts.pop(index)
        sequence = _Sequence(index, [prompt.first_token], prompt.keys, prompt.values)
        _finish(sequence, tokenizer, limits, decided)
        if sequence.done:
            results[index] = sequence.known
        else:
            running.append(sequence)
    return running, results


class _Decoder:
    """Runs decoding passes: each pass puts its sequences' keys and values side by side, right-aligned."""

    def __init__(self, device, head: GreedyHead | None, position_wise: list[torch.nn.Module], pad_id: int):
        self.device = device
        self.head = head
        self.position_wise = position_wise  # run on real tokens only, not on padding (see real_positions)
        self.pad_id = pad_id
        self.cache: DynamicCache | None = None
        self.before = 0  # slots per row before the pass's own tokens
        self.pads: list[int] = []  # per row, empty slots on the left

    def step(self, model, sequences: list[_Sequence], drafts: list[list[int]]) -> list[list[int]]:
        """One forward pass over each sequence's last token and draft; row r, column j: the model's token after draft[:j]."""
        self.before = max(s.slots for s in sequences)
        self.pads = [self.before - s.slots for s in sequences]
        layers = [
            (torch.stack([_left_slots(s.keys[i], pad) for s, pad in zip(sequences, self.pads, strict=True)]),
             torch.stack([_left_slots(s.values[i], pad) for s, pad in zip(sequences, self.pads, strict=True)]))
            for i in range(len(sequences[0].keys))
        ]  # fmt: skip
        self.cache = DynamicCache(ddp_cache_data=layers)
        width = 1 + max(len(draft) for draft in drafts)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), self.before + width), dtype=torch.long)
        for row, (sequence, draft, pad) in enumerate(zip(sequences, drafts, self.pads, strict=True)):
            ids[row, : 1 + len(draft)] = torch.tensor([sequence.known[-1], *draft])
            mask[row, pad : self.before + 1 + len(draft)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        inputs = dict(input_ids=ids, attention_mask=mask, position_ids=positions(mask, width))
        real = mask[:, -width:].bool()
        projection = model.get_output_embeddings()
        with on_real_positions(self.position_wise, real):
            if projection is None:  # no separate output projection to call: the model's own pass
                output = model(**inputs, cache=self.cache, use_cache=True, logits_to_keep=width)
            else:
                output = model.get_decoder()(**inputs, cache=self.cache, use_cache=True)
        self.cache = output.cache
        if projection is None:
            return output.logits.argmax(-1).tolist()
        # Only each row's last token and draft need a greedy token, so the output projection
        # (the largest product of the pass) skips the padding after shorter drafts too. Scaling
        # or capping that a model applies to its logits afterwards is monotone: same argmax.
        hidden = output.last_hidden_state[:, -width:][real]
        chosen = self.head.tokens(hidden) if self.head is not None else projection(hidden).argmax(-1)
        tokens = torch.full((len(sequences), width), self.pad_id, dtype=torch.long, device=self.device)
        tokens[real] = chosen
        return tokens.tolist()

    def keep(self, row: int, sequence: _Sequence, new_slots: int) -> None:
        """Give the sequence back its slots from the last pass: its own before it, and `new_slots` of the pass."""
        first, end = self.pads[row], self.before + new_slots
        sequence.keys = [layer.keys[row, :, first:end].clone() for layer in self.cache.layers]
        sequence.values = [layer.values[row, :, first:end].clone() for layer in self.cache.layers]


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
