"""Start-up measurements: a good batch size, and the prefix every response starts with."""

from __future__ import annotations

import os
import time

import torch

from apostate.decoding import CpuKernels, PromptSet
from apostate.progress import console

PREFIX_SAMPLE = 8  # prompts per side used to detect a common response prefix
PREFIX_TOKENS = 12


def find_batch_size(
    model, tokenizer, texts: list[str], max_batch_size: int, device, new_tokens: int, kernels: CpuKernels | None = None
) -> int:
    """The batch size that generates `new_tokens`-token responses fastest.

    For each candidate (doubling from 1) two short generations separate the cost of the
    prompt pass from the cost of one decoding step; the estimated time of a real batch is
    prompt + new_tokens × step. Decoding is bandwidth-bound on most hardware, so it keeps
    paying to batch long after the prompt pass stops paying. The search ends early once a
    size is clearly slower than the best so far, or runs out of memory.
    """
    best_size, best_rate = 1, 0.0
    _timed(model, tokenizer, texts[:1], 2, device, kernels)  # warm-up
    limit = min(max_batch_size, len(texts))
    candidates = [2**power for power in range(limit.bit_length()) if 2**power < limit] + [limit]
    for size in candidates:
        try:
            prompt_pass = _timed(model, tokenizer, texts[:size], 1, device, kernels)
            step = (_timed(model, tokenizer, texts[:size], 5, device, kernels) - prompt_pass) / 4
        except torch.OutOfMemoryError:
            break
        rate = size / (prompt_pass + max(step, 0.0) * new_tokens)
        console.print(f"  * batch size {size}: {rate:.1f} responses/s (estimated)")
        if rate > best_rate:
            best_size, best_rate = size, rate
        elif rate < 0.7 * best_rate:
            break  # clearly past the best: larger batches only cost more
    return best_size


def _timed(model, tokenizer, texts, new_tokens, device, kernels) -> float:
    start = time.perf_counter()
    PromptSet(tokenizer, texts, len(texts), device, kernels).greedy_responses(model, new_tokens)
    return time.perf_counter() - start


def sample_responses(
    model, tokenizer, texts: list[str], batch_size: int, device, kernels: CpuKernels | None = None
) -> list[str]:
    """Short greedy responses (PREFIX_TOKENS) to a few texts: what the prefix is detected from."""
    return PromptSet(tokenizer, texts, batch_size, device, kernels).greedy_responses(model, PREFIX_TOKENS)


def common_response_prefix(responses: list[str], cot_skips: list[tuple[str, str]]) -> str:
    """Text all sampled responses start with: a chain-of-thought opening becomes its closed
    empty block (so scoring sees the answer, not the thinking); other shared text is kept
    up to its last whitespace, so a word is never cut in half."""
    common = os.path.commonprefix(responses)
    for opening, closed in cot_skips:
        if common.lstrip().startswith(opening):
            return closed
    cut = max(common.rfind(" "), common.rfind("\n"))
    return common[: cut + 1] if cut >= 0 and common[: cut + 1].strip() else ""
