"""Tokenizing chat texts into left-padded batches, shortest-first to cut padding."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

import torch


class PassObserver(Protocol):
    """What a pass over prompt batches may carry for another stage: entered around the pass (to
    hook the model), told how many texts it runs (`expect`), then each batch (indices into the
    texts, model inputs) before its forward."""

    def __enter__(self) -> PassObserver: ...
    def __exit__(self, *exc) -> None: ...
    def expect(self, count: int) -> None: ...
    def batch(self, indices: list[int], inputs: dict) -> None: ...


def batches(tokenizer, texts: list[str], batch_size: int, device) -> Iterator[tuple[list[int], dict]]:
    """Yield (indices into texts, model inputs) batches, grouped by token length.

    Sorting by length keeps similar lengths together, so little compute goes to padding;
    callers put results back in order through the indices.
    """
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        inputs = tokenizer([texts[i] for i in indices], return_tensors="pt", padding=True, add_special_tokens=False).to(
            device
        )
        yield indices, inputs


@torch.inference_mode()
def last_position_logprobs(model, tokenizer, texts: list[str], batch_size: int, device) -> torch.Tensor:
    """Log-probabilities of the first response token, (len(texts), vocab), float32 on CPU."""
    rows: list[torch.Tensor | None] = [None] * len(texts)
    for indices, inputs in batches(tokenizer, texts, batch_size, device):
        logits = model(**inputs, use_cache=False, logits_to_keep=1).logits[:, -1, :]
        logprobs = torch.log_softmax(logits.float(), dim=-1).cpu()
        for row, index in enumerate(indices):
            rows[index] = logprobs[row]
    return torch.stack(rows)


def left_padded(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(input ids, mask) with every row right-aligned."""
    width = max(len(row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for index, row in enumerate(rows):
        if row:
            ids[index, width - len(row) :] = torch.tensor(row)
            mask[index, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


@torch.inference_mode()
def position_logprobs(
    model, rows: list[list[int]], counts: list[int], batch_size: int, pad_id: int, device, reduce=None
) -> list[torch.Tensor]:
    """Log-probabilities at each token row's last `counts[i]` positions, (counts[i], vocab) float32
    on CPU: rows left-padded and masked, shortest first, no cache. `reduce(i, rows)`: what to keep
    of text i's rows instead of them (a pass over many texts then holds no vocabulary per position)."""
    result: list[torch.Tensor | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    for start in range(0, len(order), batch_size):
        indices = order[start : start + batch_size]
        ids, mask = left_padded([rows[i] for i in indices], pad_id, device)
        keep = max(counts[i] for i in indices)
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=keep)
        logprobs = torch.log_softmax(logits.logits.float(), dim=-1).cpu()
        for row, index in enumerate(indices):
            own = logprobs[row, keep - counts[index] :]
            result[index] = reduce(index, own) if reduce else own
    return result
