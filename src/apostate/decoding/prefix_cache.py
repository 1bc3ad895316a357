"""Compute the chat-template prefix that all prompts share once per pass, not once per prompt.

With a system prompt, a third or more of every templated prompt is the same tokens. Their
keys and values are computed once (they do change with every trial's edit) and copied into
each batch; each prompt then only runs its own tokens. Prompts are left-padded after the
prefix, with the padding masked and positions counted over unmasked tokens, so the model
sees what it would see without the shared cache.

`prompt_passes` runs prompts this way a batch at a time (replaying unedited layers, see
layer_replay); `shared_prefix_logprobs` reads the last position's log-probabilities, and
`prefill` keeps each prompt's greedy first token and keys and values for generation
(speculative.py). `PromptSet` (prompt_set.py) is what the rest of apostate calls.

Only plain full-attention caches are shared: sliding-window and recurrent layers count
slots, not unmasked tokens, so those models take the ordinary path (`SharedPrefix.cache`
returns None).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from apostate.decoding.batching import left_padded
from apostate.decoding.layer_replay import LayerReplay


@dataclass
class SharedPrefix:
    """Token ids of every text split into the common prefix and each text's own suffix."""

    prefix: list[int]
    suffixes: list[list[int]]

    @classmethod
    def of(cls, tokenizer, texts: list[str]) -> SharedPrefix:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        length = 0
        shortest = min(len(row) for row in ids)
        # Every suffix keeps at least one token: the position whose output is read.
        while length < shortest - 1 and all(row[length] == ids[0][length] for row in ids):
            length += 1
        return cls(ids[0][:length], [row[length:] for row in ids])

    def cache(self, model, device) -> DynamicCache | None:
        """The prefix's keys and values for batch size 1, or None where they cannot be shared."""
        if self.prefix:
            cache = model(input_ids=torch.tensor([self.prefix], device=device), use_cache=True, logits_to_keep=1).cache
        else:
            cache = DynamicCache(config=model.config)
        return cache if _plain_cache(cache) else None


def _plain_cache(cache) -> bool:
    layers = getattr(cache, "layers", None)
    if type(cache) is not DynamicCache or layers is None:
        return False
    return not any(getattr(layer, "is_sliding", False) or getattr(layer, "is_linear", False) for layer in layers)


def batch_cache(prefix_cache: DynamicCache, batch_size: int) -> DynamicCache:
    cache = copy.deepcopy(prefix_cache)
    if cache.get_seq_length() > 0:
        cache.batch_repeat_interleave(batch_size)
    return cache


def positions(mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position ids of the last `new` slots: the count of unmasked slots before each."""
    return (mask.cumsum(-1) - 1).clamp(min=0)[:, -new:]


@dataclass
class PromptPasses:
    """How to run the prompts: `batch_size` at a time in `order`, replaying the first `unchanged` layers."""

    order: list[int]
    batch_size: int
    pad_id: int
    device: object
    replay: LayerReplay | None = None
    unchanged: int = 0  # leading decoder layers known equal to the base model's (see layer_replay)
    positions: int = 1  # trailing positions whose logits a pass keeps


def prompt_passes(model, shared: SharedPrefix, prefix_cache, passes: PromptPasses):
    """One forward pass per batch of prompts: yields (indices, suffix width, output).

    The output holds the last `passes.positions` positions' logits and the whole batch's cache:
    the prefix, then each suffix right-aligned in `suffix width` slots.
    """
    for start in range(0, len(passes.order), passes.batch_size):
        indices = passes.order[start : start + passes.batch_size]
        ids, chunk_mask = left_padded([shared.suffixes[i] for i in indices], passes.pad_id, passes.device)
        prefix_mask = torch.ones((len(indices), len(shared.prefix)), dtype=torch.long, device=passes.device)
        mask = torch.cat([prefix_mask, chunk_mask], dim=1)
        replaying = (
            passes.replay.around(model, tuple(indices), passes.unchanged, len(shared.prefix))
            if passes.replay
            else nullcontext()
        )
        with replaying as keeper:
            output = model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=positions(mask, ids.shape[1]),
                cache=batch_cache(prefix_cache, len(indices)),
                use_cache=True,
                logits_to_keep=passes.positions,
            )
            if keeper is not None:
                keeper.keep_cache(output.cache)
        yield indices, ids.shape[1], output


@dataclass
class PromptState:
    """A templated prompt after its forward pass: its greedy first token and its keys and values."""

    first_token: int
    keys: list[torch.Tensor]  # per layer (heads, prompt tokens, head dim), prefix included
    values: list[torch.Tensor]


@torch.inference_mode()
def prefill(model, shared: SharedPrefix, prefix_cache, passes: PromptPasses) -> dict[int, PromptState]:
    """Every prompt's state, keyed by index; prompts of similar length share a pass (sorted order)."""
    states: dict[int, PromptState] = {}
    prefix_length = len(shared.prefix)
    for indices, width, output in prompt_passes(model, shared, prefix_cache, passes):
        first_tokens = output.logits[:, -1].argmax(-1).tolist()
        layers = output.cache.layers
        for row, index in enumerate(indices):
            pad = width - len(shared.suffixes[index])

            def own(tensor, row=row, pad=pad):  # the row's prefix and suffix slots, not its padding
                return torch.cat([tensor[row, :, :prefix_length], tensor[row, :, prefix_length + pad :]], 1)

            states[index] = PromptState(
                first_tokens[row], [own(layer.keys) for layer in layers], [own(layer.values) for layer in layers]
            )
    return states


@torch.inference_mode()
def shared_prefix_logprobs(model, shared: SharedPrefix, prefix_cache, passes: PromptPasses) -> torch.Tensor:
    """As batching.last_position_logprobs, the shared prefix computed once: (texts, vocab), float32 on CPU."""
    rows: list[torch.Tensor | None] = [None] * len(shared.suffixes)
    for indices, _, output in prompt_passes(model, shared, prefix_cache, passes):
        logprobs = torch.log_softmax(output.logits[:, -1, :].float(), dim=-1).cpu()
        for row, index in enumerate(indices):
            rows[index] = logprobs[row]
    return torch.stack(rows)


@torch.inference_mode()
def shared_prefix_position_logprobs(
    model, shared: SharedPrefix, prefix_cache, passes: PromptPasses, counts: list[int], reduce=None
) -> list[torch.Tensor]:
    """Log-probabilities at each text's last `counts[i]` positions, (counts[i], vocab) float32 on
    CPU per text: a suffix that ends in a known answer, teacher-forced in one pass. `reduce`: as
    batching.position_logprobs."""
    rows: list[torch.Tensor | None] = [None] * len(shared.suffixes)
    for indices, _, output in prompt_passes(model, shared, prefix_cache, passes):
        logprobs = torch.log_softmax(output.logits.float(), dim=-1).cpu()
        for row, index in enumerate(indices):
            own = logprobs[row, logprobs.shape[1] - counts[index] :]
            rows[index] = reduce(index, own) if reduce else own
    return rows
