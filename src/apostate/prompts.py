"""Prompt sets: load them from wherever they live, split them, wrap them in the chat template."""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

from apostate.errors import ApostateError, first_line
from apostate.model.chat_template import render
from apostate.model.sources import looks_like_path

if TYPE_CHECKING:
    from apostate.prompt_settings import PromptSetSpec
    from apostate.settings import Settings

PROMPT_COLUMNS = ("prompt", "text", "instruction", "question", "goal")
CATEGORY_COLUMN = "category"  # .jsonl, .csv and datasets may tag each prompt (harm categories)
Row = tuple[str, "str | None"]  # a prompt and its category
LOCAL_SUFFIXES = (".txt", ".jsonl", ".csv")


@dataclass(frozen=True)
class PromptSplit:
    """One side's prompts, split without overlap."""

    direction: list[str]
    evaluation: list[str]
    heldout: list[str]


@dataclass(frozen=True)
class PromptSplits:
    """Both sides' prompts, each split; `categories`: the category of each tagged prompt."""

    harmless: PromptSplit
    harmful: PromptSplit
    categories: dict[str, str] = field(default_factory=dict)

    def sha256(self) -> dict[str, str]:
        """sha256 of each split's prompts (as JSON text), e.g. {"harmful/direction": ...}."""
        hashes = {}
        for side in ("harmless", "harmful"):
            split = getattr(self, side)
            for subset in ("direction", "evaluation", "heldout"):
                text = json.dumps(getattr(split, subset), ensure_ascii=False)
                hashes[f"{side}/{subset}"] = hashlib.sha256(text.encode()).hexdigest()
        return hashes


def load_prompt_splits(settings: Settings) -> PromptSplits:
    harmless_rows = load_prompt_rows(settings.harmless)
    harmful_rows = load_prompt_rows(settings.harmful)
    harmless, harmful = [p for p, _ in harmless_rows], [p for p, _ in harmful_rows]
    _refuse_shared_prompts(harmless, harmful, settings)
    categories = {prompt: category for prompt, category in harmless_rows + harmful_rows if category}
    return PromptSplits(
        harmless=split_prompts(harmless, settings.harmless, "harmless", categories),
        harmful=split_prompts(harmful, settings.harmful, "harmful", categories),
        categories=categories,
    )


def _refuse_shared_prompts(harmless: list[str], harmful: list[str], settings: Settings) -> None:
    """A prompt in both sets would pull the harmless and harmful means together: a user error, not data."""
    harmful_set = set(harmful)
    shared = [prompt for prompt in harmless if prompt in harmful_set]
    if not shared:
        return
    first = shared[0] if len(shared[0]) <= 80 else shared[0][:77] + "..."
    raise ApostateError(
        f"the harmless ('{settings.harmless.source}') and harmful ('{settings.harmful.source}') prompt sets "
        f"share {len(shared)} prompt{'s' if len(shared) != 1 else ''} (first: {first!r}); "
        "remove them from one of the sets"
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
    return [prompt for prompt, _ in load_prompt_rows(spec)]


def load_prompt_rows(spec: PromptSetSpec) -> list[Row]:
    """All prompts of a source with their categories (None where untagged), stripped,
    deduplicated (the first category of a repeated prompt stands), in source order."""
    source = spec.source
    if source.startswith("bundled:"):
        _refuse_dataset_options(spec, "a bundled set")
        rows = _read_bundled(source.removeprefix("bundled:"))
    elif is_local_source(source):
        _refuse_dataset_options(spec, "a local file")
        rows = _read_local(Path(source).expanduser(), spec.column)
    else:
        rows = _read_dataset(spec)
    unique: dict[str, str | None] = {}
    for prompt, category in rows:
        if prompt and prompt.strip():
            unique.setdefault(prompt.strip(), category.strip() if category and category.strip() else None)
    if not unique:
        raise ApostateError(f"prompt source '{source}' holds no prompts")
    if all(_is_number(prompt) for prompt in unique):
        raise ApostateError(
            f"prompt source '{source}' holds numbers, not prompts (first: {next(iter(unique))}); "
            "set column to the one holding the prompts' text"
        )
    return [(spec.prefix + prompt + spec.suffix, category) for prompt, category in unique.items()]


def is_local_source(source: str) -> bool:
    """The rule for a prompt source that is not `bundled:`: a local file if it ends in .txt,
    .jsonl or .csv, exists, or looks like a path as a model argument does (starts with ., / or
    ~, or names more than one folder level); otherwise a Hugging Face dataset id ('name' or 'owner/name')."""
    path = Path(source)
    return path.suffix.lower() in LOCAL_SUFFIXES or looks_like_path(source) or path.exists()


def _refuse_dataset_options(spec: PromptSetSpec, what: str) -> None:
    """split and revision choose from a hub dataset; for a file they would be ignored without a word."""
    given = [name for name in ("split", "revision") if getattr(spec, name) is not None]
    if given:
        raise ApostateError(
            f"prompt source '{spec.source}' is {what}, which has no {given[0]} (only Hugging Face datasets do); "
            f"remove {given[0]} from its settings"
        )


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def split_prompts(
    prompts: list[str], spec: PromptSetSpec, side: str | None = None, categories: dict[str, str] | None = None
) -> PromptSplit:
    """Shuffle with the spec's seed, then cut direction / evaluation / held-out slices.

    With `categories` (of tagged prompts), the shuffled prompts are dealt out category by
    category in turn, so every slice covers the categories evenly.
    `side`: harmless or harmful, to name its settings in an error."""
    needed = spec.direction_count + spec.evaluation_count + spec.heldout_count
    if needed > len(prompts):
        named = f"{side} prompt source" if side else "prompt source"
        counts = f"--{side}.direction-count / evaluation-count / heldout-count" if side else "the counts"
        raise ApostateError(
            f"{named} '{spec.source}' has {len(prompts)} prompts, but direction_count + "
            f"evaluation_count + heldout_count = {needed}; lower {counts} or add prompts"
        )
    shuffled = list(prompts)
    random.Random(spec.shuffle_seed).shuffle(shuffled)
    if categories and any(prompt in categories for prompt in shuffled):
        shuffled = _dealt_by_category(shuffled, categories)
    first = spec.direction_count
    second = first + spec.evaluation_count
    return PromptSplit(
        direction=shuffled[:first],
        evaluation=shuffled[first:second],
        heldout=shuffled[second:needed],
    )


def _dealt_by_category(prompts: list[str], categories: dict[str, str]) -> list[str]:
    """The i-th prompt of every category (in order of first appearance), then the (i+1)-th, ..."""
    rank: dict[str, int] = {}
    first_seen: dict[str, int] = {}
    keys = {}
    for prompt in prompts:
        category = categories.get(prompt, "")
        first_seen.setdefault(category, len(first_seen))
        keys[prompt] = (rank.get(category, 0), first_seen[category])
        rank[category] = rank.get(category, 0) + 1
    return sorted(prompts, key=keys.__getitem__)


def _read_bundled(name: str) -> list[Row]:
    data = resources.files("apostate") / "data"
    if (data / f"{name}.jsonl").is_file():  # tagged with categories
        return _jsonl_rows((data / f"{name}.jsonl").read_text(encoding="utf-8"), None, Path(f"bundled:{name}"))
    if not (data / f"{name}.txt").is_file():
        raise ApostateError(f"there is no bundled prompt set '{name}' (use bundled:harmless or bundled:harmful)")
    return [(line, None) for line in (data / f"{name}.txt").read_text(encoding="utf-8").splitlines()]


def _read_local(path: Path, column: str | None) -> list[Row]:
    if path.is_dir():
        raise ApostateError(
            f"prompt source {path} is a folder; give a .txt, .jsonl or .csv file, "
            "a bundled set (bundled:harmless, bundled:harmful) or a Hugging Face dataset id"
        )
    if not path.is_file():
        raise ApostateError(f"prompt file {path} does not exist")
    text = _read_text(path)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _jsonl_rows(text, column, path)
    if suffix == ".csv":
        try:
            rows = list(csv.DictReader(text.splitlines()))
        except csv.Error as error:
            raise ApostateError(f"{path}: not valid CSV ({error}); save it as CSV with a header line") from None
        return _column_values(rows, column, str(path))
    if column is not None:
        raise ApostateError(
            f"prompt file {path} is plain text (one prompt a line), which has no column '{column}'; "
            "remove column, or give a .jsonl or .csv file"
        )
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and all(_is_json_object(line) for line in lines):
        raise ApostateError(
            f"prompt file {path} holds a JSON object on every line, which a .txt file would take as the prompts' "
            "text; name it .jsonl"
        )
    return [(line, None) for line in text.splitlines()]


def _read_text(path: Path) -> str:
    """The file's text, as UTF-8 (a byte-order mark is dropped); anything else is one clear line."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ApostateError(f"cannot read prompt file {path}: {error.strerror or first_line(error)}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise ApostateError(
            f"prompt file {path} is not UTF-8 text (byte 0x{data[error.start]:02x} on line {line}); "
            "save it as UTF-8 text"
        ) from None


def _jsonl_rows(text: str, column: str | None, path: Path) -> list[Row]:
    """The prompts of a .jsonl file: every line a JSON string, or every line a JSON object."""
    rows: list[tuple[int, str | dict]] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ApostateError(f"{path}:{number}: not valid JSON ({error.msg}, column {error.colno})") from None
        if not isinstance(row, (str, dict)):
            raise ApostateError(
                f"{path}:{number}: a JSON {_json_kind(row)}; every line must be a JSON object or a JSON string"
            )
        if rows and type(row) is not type(rows[0][1]):
            first_number, first = rows[0]
            raise ApostateError(
                f"{path}:{number}: a JSON {_json_kind(row)}, but line {first_number} is a JSON "
                f"{_json_kind(first)}; make every line a JSON object or every line a JSON string"
            )
        rows.append((number, row))
    if not rows or isinstance(rows[0][1], str):
        return [(row, None) for _, row in rows]
    name = _prompt_column(rows[0][1].keys(), column, str(path))
    for number, row in rows:
        if name not in row:
            raise ApostateError(
                f"{path}:{number}: no key '{name}' (it has: {', '.join(row) or 'none'}); every line needs '{name}'"
            )
    for number, row in rows:
        if row[name] is not None and not isinstance(row[name], str):
            raise ApostateError(
                f"{path}:{number}: '{name}' is a JSON {_json_kind(row[name])}, not text; every prompt must be a "
                "JSON string (set column to the key holding the prompts' text)"
            )
    return [(row[name] or "", _category(row)) for _, row in rows]


def _is_json_object(line: str) -> bool:
    if not line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def _json_kind(value) -> str:
    kinds = {str: "string", dict: "object", list: "array", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _prompt_column(keys, column: str | None, where: str) -> str:
    """The named column, else the first of PROMPT_COLUMNS present; one clear line when there is none."""
    keys = list(keys)
    name = column or next((c for c in PROMPT_COLUMNS if c in keys), None)
    if name is None or name not in keys:
        wanted = f"no column '{column}'" if column else f"none of the columns {', '.join(PROMPT_COLUMNS)}"
        raise ApostateError(
            f"{where} has {wanted} (it has: {', '.join(map(str, keys))}); set column to the one holding the prompts"
        )
    return name


def _column_values(rows: list, column: str | None, where: str) -> list[Row]:
    """The prompt column of rows (dicts), with the category column where there is one."""
    if not rows:
        return []
    name = _prompt_column(rows[0].keys(), column, where)
    return [(str(row.get(name) or ""), _category(row)) for row in rows]


def _category(row: dict) -> str | None:
    value = row.get(CATEGORY_COLUMN)
    return str(value) if value not in (None, "") else None


def _read_dataset(spec: PromptSetSpec) -> list[Row]:
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
    return [render(tokenizer, prompt, system_prompt) + response_prefix for prompt in prompts]
