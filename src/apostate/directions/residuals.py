"""Hidden states at the last prompt position, for every layer (and the embeddings): their means
(what a run needs), or every prompt's (what `apostate inspect` looks at)."""

from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor

from apostate.decoding.batching import PassObserver, batches
from apostate.directions.refusal import winsorize
from apostate.progress import track


class ResidualMeans(NamedTuple):
    """The mean over all prompts, and over each half of them (even- and odd-numbered prompts),
    which tells how much of a difference of means is noise (refusal.direction_agreement)."""

    mean: Tensor  # (layers + 1, hidden)
    halves: tuple[Tensor, Tensor]


@torch.inference_mode()
def residual_means(
    model,
    tokenizer,
    texts: list[str],
    batch_size: int,
    device,
    winsorization_quantile: float,
    label: str,
    keep_on="cpu",
    observer: PassObserver | None = None,
) -> ResidualMeans:
    """(layers + 1, hidden) float32 means of the hidden states at the last prompt token.

    Accumulates running sums batch by batch (all prompts, and the even-numbered ones), so
    memory stays at one batch of hidden states however many prompts there are. `observer`
    watches the same forward passes (a method recording what it fits to: one pass, not two).
    """
    total: Tensor | None = None
    even: Tensor | None = None
    with observer or nullcontext(), track(label, total=len(texts)) as advance:
        if observer is not None:
            observer.expect(len(texts))
        for indices, inputs in batches(tokenizer, texts, batch_size, device):
            if observer is not None:
                observer.batch(indices, inputs)
            states = _last_token_states(model, inputs, winsorization_quantile, keep_on)
            batch_sum = states.sum(dim=0)
            total = batch_sum if total is None else total + batch_sum
            even_rows = [row for row, index in enumerate(indices) if index % 2 == 0]
            even_sum = states[even_rows].sum(dim=0)
            even = even_sum if even is None else even + even_sum
            advance(len(indices))
    count_even = (len(texts) + 1) // 2
    count_odd = max(len(texts) - count_even, 1)
    halves = ((even / count_even).cpu(), ((total - even) / count_odd).cpu())
    return ResidualMeans((total / len(texts)).cpu(), halves)


@torch.inference_mode()
def prompt_residuals(
    model, tokenizer, texts: list[str], batch_size: int, device, winsorization_quantile: float, label: str
) -> Tensor:
    """(prompts, layers + 1, hidden) float32 hidden states at the last prompt token of every
    prompt, in the order of `texts`, on the CPU; winsorized as `residual_means` does, so their
    mean over prompts is what it returns (up to the order of the sums).

    Holds every prompt's states: prompts × (layers + 1) × hidden × 4 bytes.
    """
    rows: list[Tensor | None] = [None] * len(texts)
    with track(label, total=len(texts)) as advance:
        for indices, inputs in batches(tokenizer, texts, batch_size, device):
            states = _last_token_states(model, inputs, winsorization_quantile, "cpu")
            for row, index in enumerate(indices):
                rows[index] = states[row].clone()  # not a view: the batch's storage can go
            advance(len(indices))
    return torch.stack(rows)


def _last_token_states(model, inputs: dict, winsorization_quantile: float, keep_on) -> Tensor:
    """(batch, layers + 1, hidden) float32 winsorized hidden states at the last position."""
    outputs = model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
    # (batch, positions, hidden): position 0 is the embedding output.
    states = torch.stack([h[:, -1, :] for h in outputs.hidden_states], dim=1).to(keep_on, torch.float32)
    return winsorize(states, winsorization_quantile)
