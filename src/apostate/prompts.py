"""Prompt sets: load them from wherever they live, split them, wrap them in the chat template."""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import ApostateError, first_line
from .settings import PromptSetSpec, Settings

PROMPT_COLUMNS = ("prompt", "text", "instruction", "question", "goal")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".csv")


@dataclass(frozen=True)
class PromptSplit:
    """One side's prompts, split without overlap."""

    direction: list[str]
    evaluation: list[str]
    heldout: list[str]


@dataclass(frozen=True)
class PromptSplits:
    """Both sides' prompts, each split."""

    harmless: PromptSplit
    harmful: PromptSplit


def load_prompt_splits(settings: Settings) -> PromptSplits:
    return PromptSplits(
        harmless=split_prompts(load_prompts(settings.harmless), settings.harmless),
        harmful=split_prompts(load_prompts(settings.harmful), settings.harmful),
    )


class Texts:
    """Chat-templated texts of the prompt splits, with the run's system prompts and response prefix."""

    def __init__(self, tokenizer, settings: Settings, prompts: PromptSplits, response_prefix: str):
        self.tokenizer = tokenizer
        self.settings = settings
        self.prompts = prompts
        self.response_prefix = response_prefix

    def of(self, side: str, subset: str) -> list[str]:
        """`side`: harmless or harmful; `subset`: direction, evaluation or heldout."""
        spec: PromptSetSpec = getattr(self.settings, side)
        system = spec.system_prompt if spec.system_prompt is not None else self.settings.system_prompt
        split: PromptSplit = getattr(self.prompts, side)
        return chat_texts(self.tokenizer, getattr(split, subset), system, self.response_prefix)


def load_prompts(spec: PromptSetSpec) -> list[str]:
    """All prompts of a source, stripped, deduplicated, in source order."""
    source = spec.source
    if source.startswith("bundled:"):
        prompts = _read_bundled(source.removeprefix("bundled:"))
    elif Path(source).suffix.lower() in LOCAL_SUFFIXES or Path(source).exists():
        prompts = _read_local(Path(source), spec.column)
    else:
        prompts = _read_dataset(spec)
    unique = list(dict.fromkeys(p.strip() for p in prompts if p and p.strip()))
    if not unique:
        raise ApostateError(f"prompt source '{source}' holds no prompts")
    return [spec.prefix + p + spec.suffix for p in unique]


def split_prompts(prompts: list[str], spec: PromptSetSpec) -> PromptSplit:
    """Shuffle with the spec's seed, then cut direction / evaluation / held-out slices."""
    needed = spec.direction_count + spec.evaluation_count + spec.heldout_count
    if needed > len(prompts):
        raise ApostateError(
            f"prompt source '{spec.source}' has {len(prompts)} prompts, but direction_count + "
            f"evaluation_count + heldout_count = {needed}; lower the counts or add prompts"
        )
    shuffled = list(prompts)
    random.Random(spec.shuffle_seed).shuffle(shuffled)
    first = spec.direction_count
    second = first + spec.evaluation_count
    return PromptSplit(
        direction=shuffled[:first],
        evaluation=shuffled[first:second],
        heldout=shuffled[second:needed],
    )


def _read_bundled(name: str) -> list[str]:
    resource = resources.files("apostate") / "data" / f"{name}.txt"
    if not resource.is_file():
        raise ApostateError(f"there is no bundled prompt set '{name}' (use bundled:harmless or bundled:harmful)")
    return resource.read_text(encoding="utf-8").splitlines()


def _read_local(path: Path, column: str | None) -> list[str]:
    if not path.is_file():
        raise ApostateError(f"prompt file {path} does not exist")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ApostateError(f"{path}:{number}: not valid JSON ({error.msg})") from None
        return _column_values(rows, column, str(path))
    if suffix == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
        return _column_values(rows, column, str(path))
    return text.splitlines()


def _column_values(rows: list, column: str | None, where: str) -> list[str]:
    """The prompt column of rows (dicts), or the rows themselves when they are strings."""
    if all(isinstance(row, str) for row in rows):
        return rows
    if not rows:
        return []
    keys = rows[0].keys() if isinstance(rows[0], dict) else []
    name = column or next((c for c in PROMPT_COLUMNS if c in keys), None)
    if name is None or name not in keys:
        wanted = f"no column '{column}'" if column else f"none of the columns {', '.join(PROMPT_COLUMNS)}"
        raise ApostateError(f"{where} has {wanted} (it has: {', '.join(map(str, keys))}); set the column")
    return [str(row.get(name) or "") for row in rows]


def _read_dataset(spec: PromptSetSpec) -> list[str]:
    """A Hugging Face dataset; any failure (offline, unknown id, bad split) is one clear line."""
    import datasets

    datasets.disable_progress_bars()
    try:
        dataset = datasets.load_dataset(spec.source, split=spec.split or "train", revision=spec.revision)
    except Exception as error:  # the datasets library raises many unrelated types here
        raise ApostateError(
            f"cannot load prompt dataset '{spec.source}': {first_line(error)} "
            "(offline? use a local .txt/.jsonl/.csv file or a bundled set)"
        ) from None
    rows = [dict(row) for row in dataset]
    return _column_values(rows, spec.column, f"dataset '{spec.source}'")


def chat_texts(tokenizer, prompts: list[str], system_prompt: str | None, response_prefix: str = "") -> list[str]:
    """Prompts rendered with the chat template, ready for generation (special tokens included)."""
    return [_render(tokenizer, prompt, system_prompt) + response_prefix for prompt in prompts]


def _render(tokenizer, prompt: str, system_prompt: str | None) -> str:
    messages = [{"role": "user", "content": prompt}]
    if system_prompt is not None:
        messages.insert(0, {"role": "system", "content": system_prompt})
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    except Exception:
        if system_prompt is None:
            raise
        # Some templates (Gemma's, for one) reject a system role: fold it into the user turn.
        merged = [{"role": "user", "content": f"{system_prompt}\n\n{prompt}"}]
        return tokenizer.apply_chat_template(merged, add_generation_prompt=True, tokenize=False)
