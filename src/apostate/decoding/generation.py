"""transformers' own greedy generation: for models whose cache cannot be shared (see prefix_cache),
and the settings every greedy generation uses (chat too)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from apostate.decoding.batching import batches

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


def stop_ids(model, tokenizer) -> set[int]:
    """The end-of-sequence ids transformers' generate would stop at."""
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    return set(eos) if isinstance(eos, list) else {eos} if eos is not None else set()


@torch.inference_mode()
def generate_plain(
    model,
    tokenizer,
    texts: list[str],
    max_new_tokens: int,
    batch_size: int,
    device,
    stop_when: Callable[[str], bool] | None = None,
    advance: Callable[[int], None] | None = None,
) -> list[str]:
    """Greedy responses to already-templated texts, in input order, by `model.generate` in length-sorted batches."""
    ids = generate_plain_ids(model, tokenizer, texts, max_new_tokens, batch_size, device, stop_when, advance)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)


@torch.inference_mode()
def generate_plain_ids(
    model,
    tokenizer,
    texts: list[str],
    max_new_tokens: int,
    batch_size: int,
    device,
    stop_when: Callable[[str], bool] | None = None,
    advance: Callable[[int], None] | None = None,
) -> list[list[int]]:
    """As generate_plain, the responses as token ids (up to, not including, an end-of-sequence id)."""
    responses: list[list[int]] = [[] for _ in texts]
    ends = stop_ids(model, tokenizer) | ({tokenizer.pad_token_id} - {None})
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
        for index, row in zip(indices, output[:, prompt_length:].tolist(), strict=True):
            end = next((position for position, token in enumerate(row) if token in ends), len(row))
            responses[index] = row[:end]
        if advance:
            advance(len(indices))
    return responses
