"""Start-up measurements: a good batch size, and the prefix every response starts with."""

from __future__ import annotations

import os
import time

import torch

from apostate.decoding import CpuKernels, PromptSet
from apostate.progress import console

PREFIX_SAMPLE = 8  # prompts per side used to detect a common response prefix
PREFIX_TOKENS = 12


SAME_SPEED = 0.9  # rates within 10% are one plateau: timing noise, not a real difference
CLEARLY_SLOWER = 0.7  # a size this much slower than the best ends the search (once confirmed)


def find_batch_size(
    model, tokenizer, texts: list[str], max_batch_size: int, device, new_tokens: int, kernels: CpuKernels | None = None
) -> int:
    """The batch size that generates `new_tokens`-token responses fastest, as measured here.

    For each candidate (doubling from 1) two short generations separate the cost of the
    prompt pass from the cost of one decoding step; the estimated rate of a real batch is
    size / (prompt + new_tokens × step). Decoding is bandwidth-bound on most hardware, so it
    keeps paying to batch long after the prompt pass stops paying.

    Load on the machine only ever slows a measurement, so the choice is made robust to it:
    a size that looks clearly slower than the best is measured again (the faster of the two
    counts) before it ends the search, and among the sizes within 10% of the best rate the
    largest is chosen, the end of the plateau, where a busy machine picks the same size as an
    idle one. What was measured, and why the size was chosen, is printed.
    """
    _timed(model, tokenizer, texts[:1], 2, device, kernels)  # warm-up
    limit = min(max_batch_size, len(texts))
    candidates = [2**power for power in range(limit.bit_length()) if 2**power < limit] + [limit]
    rates: dict[int, float] = {}
    for size in candidates:
        try:
            rate = _rate(model, tokenizer, texts[:size], device, new_tokens, kernels)
            if rates and rate < CLEARLY_SLOWER * max(rates.values()):
                rate = max(rate, _rate(model, tokenizer, texts[:size], device, new_tokens, kernels))
        except torch.OutOfMemoryError:
            break
        rates[size] = rate
        console.print(f"  * batch size {size}: {rate:.3g} responses/s (estimated)")
        if rate < CLEARLY_SLOWER * max(rates.values()):
            break  # clearly past the best, measured twice: larger batches only cost more
    return choose_batch_size(rates)


def choose_batch_size(rates: dict[int, float]) -> int:
    """The largest size whose measured rate is within 10% of the best one (see find_batch_size)."""
    best = max(rates.values())
    chosen = max(size for size, rate in rates.items() if rate >= SAME_SPEED * best)
    fastest = max(rates, key=rates.get)
    why = "the fastest measured" if chosen == fastest else f"as fast as {fastest} within timing noise, and larger"
    console.print(f"  * chose {chosen}: {why} ({rates[chosen]:.3g} responses/s)")
    return chosen


def _rate(model, tokenizer, texts: list[str], device, new_tokens: int, kernels) -> float:
    """Responses per second at batch size len(texts), estimated from two short generations."""
    prompt_pass = _timed(model, tokenizer, texts, 1, device, kernels)
    step = (_timed(model, tokenizer, texts, 5, device, kernels) - prompt_pass) / 4
    return len(texts) / (prompt_pass + max(step, 0.0) * new_tokens)


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
