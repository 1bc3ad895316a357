"""Greedy batched generation, with early stopping once a refusal is certain."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .batching import batches
from .layer_replay import LayerReplay
from .prefix_cache import PromptPasses, SharedPrefix
from .response_pool import ResponsePool
from .speculative import DecodingLimits, speculative_greedy

# Greedy decoding; the sampling knobs are unset so a model's generation_config cannot turn them on.
GREEDY = {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}


class _StopWhenDecided(StoppingCriteria):
    """Finish a sequence as soon as `decided(text so far)` holds; the batch ends when all are done."""

    def __init__(self, tokenizer, prompt_length: int, decided: Callable[[str], bool]):
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.decided = decided

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.prompt_length :], skip_special_tokens=True)
        return torch.tensor([self.decided(text) for text in texts], device=input_ids.device)


@torch.inference_mode()
def generate(
    model,
    tokenizer,
    texts: list[str],
    max_new_tokens: int,
    batch_size: int,
    device,
    stop_when: Callable[[str], bool] | None = None,
    advance: Callable[[int], None] | None = None,
    pool: ResponsePool | None = None,
    replay: LayerReplay | None = None,
    unchanged: int = 0,
) -> list[str]:
    """Greedy responses to already-templated texts, in input order.

    With `stop_when`, a sequence stops as soon as its text satisfies it; the caller must
    only pass a condition that more text can never undo (a refusal marker has appeared).
    With a `pool` of earlier responses, those are checked as drafts and the new responses
    added to it. With a `replay`, the prompts' passes skip the first `unchanged` layers (see
    layer_replay). Models whose cache cannot be shared take transformers' own generate.
    """
    shared = SharedPrefix.of(tokenizer, texts)
    prefix_cache = shared.cache(model, device)
    if prefix_cache is None:
        return _generate_plain(model, tokenizer, texts, max_new_tokens, batch_size, device, stop_when, advance)
    limits = DecodingLimits(max_new_tokens, _stop_ids(model, tokenizer))
    order = sorted(range(len(texts)), key=lambda i: len(shared.suffixes[i]))
    passes = PromptPasses(order, batch_size, tokenizer.pad_token_id, device, replay, unchanged)
    tokens = speculative_greedy(model, tokenizer, shared, prefix_cache, passes, limits, pool, stop_when, advance)
    if pool is not None:
        for index, response in tokens.items():
            pool.add(index, response)
    return [tokenizer.decode(tokens[index], skip_special_tokens=True) for index in range(len(texts))]


def _stop_ids(model, tokenizer) -> set[int]:
    """The end-of-sequence ids transformers' generate would stop at."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()


def _generate_plain(model, tokenizer, texts, max_new_tokens, batch_size, device, stop_when, advance) -> list[str]:
    responses: list[str] = [""] * len(texts)
    for indices, inputs in batches(tokenizer, texts, batch_size, device):
        prompt_length = inputs["input_ids"].shape[1]
        criteria = StoppingCriteriaList([_StopWhenDecided(tokenizer, prompt_length, stop_when)]) if stop_when else None
        output = model.generate(
            **inputs,
            **GREEDY,
            max_new_tokens=max_new_tokens,
            stopping_criteria=criteria,
            pad_token_id=tokenizer.pad_token_id,
        )
        decoded = tokenizer.batch_decode(output[:, prompt_length:], skip_special_tokens=True)
        for index, text in zip(indices, decoded, strict=True):
            responses[index] = text
        if advance:
            advance(len(indices))
    return responses
