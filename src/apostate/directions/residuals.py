"""Residual-stream means at the last prompt position, for every layer (and the embeddings)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..decoding.batching import batches
from ..progress import track
from .refusal import winsorize


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
) -> Tensor:
    """(layers + 1, hidden) float32 mean of the hidden states at the last prompt token.

    Accumulates a running sum batch by batch, so memory stays at one batch of hidden
    states however many prompts there are.
    """
    total: Tensor | None = None
    with track(label, total=len(texts)) as advance:
        for indices, inputs in batches(tokenizer, texts, batch_size, device):
            outputs = model(**inputs, output_hidden_states=True, use_cache=False, logits_to_keep=1)
            # (batch, positions, hidden): position 0 is the embedding output.
            states = torch.stack([h[:, -1, :] for h in outputs.hidden_states], dim=1).to(keep_on, torch.float32)
            states = winsorize(states, winsorization_quantile)
            batch_sum = states.sum(dim=0)
            total = batch_sum if total is None else total + batch_sum
            advance(len(indices))
    return (total / len(texts)).cpu()
