"""Everything a run measures once before its trials: batch size, response prefix, refusal
directions, and the base model's scores. Cached in the run folder, so a resumed run starts fast."""

from __future__ import annotations

import os
import pickle
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import torch
from torch import Tensor

from apostate.decoding import CpuKernels
from apostate.decoding.batching import PassObserver
from apostate.directions.refusal import direction_agreement, refusal_directions
from apostate.directions.residuals import residual_means
from apostate.nested import agrees_on
from apostate.progress import console, warn
from apostate.prompts import PromptSplits, Texts
from apostate.scoring.calibration import PREFIX_SAMPLE, common_response_prefix, find_batch_size, sample_responses
from apostate.scoring.judges.markers import MarkerJudge
from apostate.scoring.scorer import ScoringOptions, build_scorer
from apostate.settings import Settings
from apostate.startup.checks import base_findings, direction_findings, prefix_findings

CACHE_FILE = "startup.pt"
CACHE_VERSION = 3  # raised whenever Startup changes, so older caches are measured again


@dataclass
class Startup:
    batch_size: int
    response_prefix: str
    directions: Tensor  # (layers + 1, hidden)
    base_logprobs: Tensor  # first-token log-probabilities on the harmless evaluation prompts
    base_refusals: int  # on the harmful evaluation prompts
    base_responses: list[list[int]]  # the base model's responses to them (token ids): the first trial's drafts
    seconds: dict[str, float]
    warnings: list[str] = field(default_factory=list)  # what the checks on these measurements found
    # kl_tokens > 1: its greedy answers to the harmless evaluation prompts (token ids), the KL's path
    base_harmless_answers: list[list[int]] = field(default_factory=list)


def scoring_options(settings: Settings, evaluation: bool = False) -> ScoringOptions:
    """What a scorer reads of the run's settings (`evaluation`: the held-out evaluation's, whose KL
    reads `evaluation_kl_tokens` of the base answers)."""
    markers = list(settings.refusal_markers)
    kl_tokens = settings.evaluation_kl_tokens if evaluation else settings.kl_tokens
    return ScoringOptions(settings.max_response_tokens, markers, settings.reuse_responses, kl_tokens)


def prepare(
    model,
    tokenizer,
    device,
    kernels: CpuKernels | None,
    settings: Settings,
    prompts: PromptSplits,
    run_dir: Path,
    key: dict,
    observers: dict[str, PassObserver] | None = None,
) -> Startup:
    """Measure (or reload from the run folder) what the trials need; `observers` (per side) watch
    the residual pass over the direction prompts, where it runs."""
    cache = run_dir / CACHE_FILE
    stored = read_startup(cache, key)
    if stored is not None:
        console.print("Reusing start-up measurements from the run folder.")
        for message in stored.warnings:
            warn(message)
        return stored
    seconds: dict[str, float] = {}
    with _timed(seconds, "batch_size"):
        batch_size = _batch_size(model, tokenizer, device, kernels, settings, prompts)
    with _timed(seconds, "prefix"):
        prefix, sample = measure_response_prefix(model, tokenizer, device, kernels, settings, prompts, batch_size)
    texts = Texts(tokenizer, settings, prompts, prefix)
    with _timed(seconds, "residuals"):
        directions, agreement = measure_directions(model, tokenizer, device, settings, texts, batch_size, observers)
    with _timed(seconds, "base_scores"):
        console.print("Scoring the base model...")
        scorer = build_scorer(tokenizer, device, kernels, scoring_options(settings), batch_size, texts)
        base = scorer.record_base(model)
        console.print(f"* Base model refuses [bold]{base.refusals}/{base.total}[/] harmful evaluation prompts")
    harmless_refused = sum(map(MarkerJudge(settings.refusal_markers).refuses, sample.harmless_answers(prefix)))
    findings = [
        *base_findings(base.refusals, base.total, harmless_refused, len(sample.harmless), settings.checks),
        *direction_findings(agreement, settings.checks.min_direction_agreement),
    ]
    for message in findings:
        warn(message)
    startup = Startup(
        batch_size, prefix, directions, scorer.base_logprobs, base.refusals, scorer.base_responses(), seconds,
        sample.warnings + findings, scorer.base_answers,
    )  # fmt: skip
    partial = cache.with_name(f".{cache.name}.partial")  # a kill while writing leaves no half cache
    write_startup(startup, key, partial)
    os.replace(partial, cache)
    return startup


def write_startup(startup: Startup, key: dict, target: Path | BinaryIO) -> None:
    """The measurements, with the `key` they were made for and the format's version (a file or a buffer)."""
    torch.save({"key": key, "version": CACHE_VERSION, "startup": asdict(startup)}, target)


def read_startup(cache: Path | BinaryIO, key: dict) -> Startup | None:
    """Start-up measurements written by write_startup (the run folder's cache, or a shared
    study's), if they were made for `key`.

    Read as plain data (weights_only: no pickled objects), so measurements written by another
    version of apostate, or damaged ones, are not trusted: None.
    """
    if isinstance(cache, Path) and not cache.is_file():
        return None
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of a file it then rejects
            warnings.simplefilter("ignore", UserWarning)
            stored = torch.load(cache, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError):  # older format (pickled objects), or damaged
        return None
    if not isinstance(stored, dict) or not agrees_on(stored.get("key"), key) or stored.get("version") != CACHE_VERSION:
        return None
    return Startup(**stored["startup"])


@contextmanager
def _timed(seconds: dict[str, float], name: str):
    start = time.perf_counter()
    yield
    seconds[name] = time.perf_counter() - start


def _batch_size(model, tokenizer, device, kernels, settings: Settings, prompts: PromptSplits) -> int:
    batch_size = settings.batch_size
    if batch_size == 0:
        console.print("Finding a batch size...")
        texts = Texts(tokenizer, settings, prompts, "").of("harmful", "evaluation")
        args = (settings.max_batch_size, device, settings.max_response_tokens, kernels)
        batch_size = find_batch_size(model, tokenizer, texts, *args)
    console.print(f"* Batch size: [bold]{batch_size}[/]")
    return batch_size


@dataclass
class ResponseSample:
    """The base model's short responses to a few harmless evaluation prompts (with the prefix
    the user set, if any), and what the checks on the prefix found."""

    harmless: list[str]
    warnings: list[str]

    def harmless_answers(self, prefix: str) -> list[str]:
        """The harmless responses after the detected prefix (which scoring skips)."""
        return [response.removeprefix(prefix) for response in self.harmless]


def measure_response_prefix(
    model, tokenizer, device, kernels, settings: Settings, prompts: PromptSplits, batch_size: int
) -> tuple[str, ResponseSample]:
    """The prefix every response starts with (the setting, else detected from a sample), and the sample."""
    given = settings.response_prefix
    plain = Texts(tokenizer, settings, prompts, given or "")
    harmless = plain.of("harmless", "evaluation")[:PREFIX_SAMPLE]
    harmful = plain.of("harmful", "evaluation")[:PREFIX_SAMPLE]
    responses = sample_responses(model, tokenizer, harmless + harmful, batch_size, device, kernels)
    prefix = given if given is not None else common_response_prefix(responses, settings.chain_of_thought_skips)
    thinking = prefix in {closed for _, closed in settings.chain_of_thought_skips}
    warnings = prefix_findings(prefix, given is None, thinking, responses, tokenizer)
    for message in warnings:
        warn(message)
    console.print(f"* Response prefix: [bold]{prefix!r}[/]" if prefix else "* No common response prefix")
    return prefix, ResponseSample(responses[: len(harmless)], warnings)


def measure_directions(
    model, tokenizer, device, settings: Settings, texts: Texts, batch_size: int, observers: dict | None = None
) -> tuple[Tensor, list[float]]:
    """Refusal directions from the direction prompts (the run's residual means; see directions/),
    and per decoder layer how well the two halves of the prompts agree on them. `observers[side]`
    watches that side's pass."""
    console.print("Computing refusal directions...")
    keep_on = "cpu" if settings.activations_on == "cpu" else device
    quantile = settings.winsorization_quantile
    means = {
        side: residual_means(
            model,
            tokenizer,
            texts.of(side, "direction"),
            batch_size,
            device,
            quantile,
            f"residuals ({side})",
            keep_on,
            (observers or {}).get(side),
        )
        for side in ("harmless", "harmful")
    }
    directions = refusal_directions(means["harmless"].mean, means["harmful"].mean, settings.orthogonalize_direction)
    agreement = direction_agreement(means["harmless"].halves, means["harmful"].halves)[1:]  # 0: the embeddings
    best = int(agreement.argmax())
    console.print(
        f"* Refusal direction: two halves of the prompts agree at cosine {agreement[best]:.2f} (layer {best})"
    )
    return directions, agreement.tolist()
