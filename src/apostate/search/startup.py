"""Everything a run measures once before its trials: batch size, response prefix, refusal
directions, and the base model's scores. Cached in the run folder, so a resumed run starts fast."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..directions.refusal import refusal_directions
from ..directions.residuals import residual_means
from ..progress import console
from ..prompts import PromptSplit, chat_texts, load_prompts, split_prompts
from ..scoring.calibration import PREFIX_SAMPLE, detect_response_prefix, find_batch_size
from ..scoring.refusals import RefusalDetector
from ..scoring.scorer import Scorer, ScoringSetup
from ..settings import PromptSetSpec, Settings

CACHE_FILE = "startup.pt"
CACHE_VERSION = 2  # raised whenever Startup changes, so older caches are measured again


@dataclass(frozen=True)
class PromptSets:
    harmless: PromptSplit
    harmful: PromptSplit


def load_prompt_sets(settings: Settings) -> PromptSets:
    return PromptSets(
        harmless=split_prompts(load_prompts(settings.harmless), settings.harmless),
        harmful=split_prompts(load_prompts(settings.harmful), settings.harmful),
    )


@dataclass
class Startup:
    batch_size: int
    response_prefix: str
    directions: Tensor  # (layers + 1, hidden)
    base_logprobs: Tensor  # first-token log-probabilities on the harmless evaluation prompts
    base_refusals: int  # on the harmful evaluation prompts
    base_responses: list[list[int]]  # the base model's responses to them (token ids): the first trial's drafts
    seconds: dict[str, float]


class Texts:
    """Chat-templated texts of the prompt sets, with the run's system prompts and response prefix."""

    def __init__(self, tokenizer, settings: Settings, prompts: PromptSets, response_prefix: str):
        self.tokenizer = tokenizer
        self.settings = settings
        self.prompts = prompts
        self.response_prefix = response_prefix

    def of(self, side: str, subset: str) -> list[str]:
        spec: PromptSetSpec = getattr(self.settings, side)
        system = spec.system_prompt if spec.system_prompt is not None else self.settings.system_prompt
        split: PromptSplit = getattr(self.prompts, side)
        return chat_texts(self.tokenizer, getattr(split, subset), system, self.response_prefix)


def prepare(model, tokenizer, device, settings: Settings, prompts: PromptSets, run_dir: Path, key: dict) -> Startup:
    """Measure (or reload from the run folder) what the trials need."""
    cache = run_dir / CACHE_FILE
    if cache.is_file():
        stored = torch.load(cache, weights_only=False)
        if stored.get("key") == key and stored.get("version") == CACHE_VERSION:
            console.print("Reusing start-up measurements from the run folder.")
            return stored["startup"]
    startup = _measure(model, tokenizer, device, settings, prompts)
    torch.save({"key": key, "version": CACHE_VERSION, "startup": startup}, cache)
    return startup


def _measure(model, tokenizer, device, settings: Settings, prompts: PromptSets) -> Startup:
    seconds = {}
    plain = Texts(tokenizer, settings, prompts, "")
    start = time.perf_counter()
    batch_size = settings.batch_size
    if batch_size == 0:
        console.print("Finding a batch size...")
        batch_size = find_batch_size(
            model,
            tokenizer,
            plain.of("harmful", "evaluation"),
            settings.max_batch_size,
            device,
            settings.max_response_tokens,
        )
    console.print(f"* Batch size: [bold]{batch_size}[/]")
    seconds["batch_size"] = time.perf_counter() - start

    start = time.perf_counter()
    prefix = settings.response_prefix
    if prefix is None:
        sample = plain.of("harmless", "evaluation")[:PREFIX_SAMPLE] + plain.of("harmful", "evaluation")[:PREFIX_SAMPLE]
        prefix = detect_response_prefix(model, tokenizer, sample, batch_size, device, settings.chain_of_thought_skips)
    console.print(f"* Response prefix: [bold]{prefix!r}[/]" if prefix else "* No common response prefix")
    seconds["prefix"] = time.perf_counter() - start

    texts = Texts(tokenizer, settings, prompts, prefix)
    start = time.perf_counter()
    console.print("Computing refusal directions...")
    means = {
        side: residual_means(
            model,
            tokenizer,
            texts.of(side, "direction"),
            batch_size,
            device,
            settings.winsorization_quantile,
            f"residuals ({side})",
            keep_on="cpu" if settings.activations_on == "cpu" else device,
        )
        for side in ("harmless", "harmful")
    }
    directions = refusal_directions(means["harmless"], means["harmful"], settings.orthogonalize_direction)
    seconds["residuals"] = time.perf_counter() - start

    start = time.perf_counter()
    console.print("Scoring the base model...")
    scorer = evaluation_scorer(tokenizer, device, settings, batch_size, texts)
    base = scorer.record_base(model)
    console.print(f"* Base model refuses [bold]{base.refusals}/{base.total}[/] harmful evaluation prompts")
    seconds["base_scores"] = time.perf_counter() - start
    return Startup(
        batch_size, prefix, directions, scorer.base_logprobs, base.refusals, scorer.base_responses(), seconds
    )


def evaluation_scorer(
    tokenizer, device, settings: Settings, batch_size: int, texts: Texts, subset: str = "evaluation"
) -> Scorer:
    setup = ScoringSetup(
        tokenizer,
        device,
        batch_size,
        settings.max_response_tokens,
        RefusalDetector(settings.refusal_markers),
        settings.reuse_responses,
    )
    return Scorer(setup, texts.of("harmless", subset), texts.of("harmful", subset), subset)
