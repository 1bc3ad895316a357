"""Export a chosen trial: the merged full model, or the adapter alone, with a model card and
the exact parameters needed to reproduce it.

Each export is written into a temporary sibling folder and swapped in only once complete, so
a failure (full disk, Ctrl-C) leaves the previous export where it was and nothing half-written.

The merged model is built from a fresh full-precision copy of the base on the CPU, never
from the live (possibly quantized) model: each writer gets its edit B @ A added in float32
and cast back to the checkpoint's dtype, so the saved weights are the weights that were scored.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from apostate.errors import ApostateError, first_line
from apostate.model.adapter import ADAPTER, Adapter
from apostate.model.architecture import WriterEdit
from apostate.model.identity import base_identity
from apostate.model.sources import ModelSource
from apostate.progress import console, track
from apostate.results.card import write_card
from apostate.results.gguf_file import gguf_label, write_gguf
from apostate.results.merge import (
    INDEX_NAME,
    MODEL_FILE_PATTERNS,
    Checkpoint,
    copy_model_files,
    parameter_name,
    stream_merge,
)
from apostate.results.modelfile import write_modelfile
from apostate.results.record import write_record


@dataclass
class TrialSummary:
    """What a model card and apostate.json say about the exported trial."""

    method: str
    trial_number: int
    raw_parameters: dict  # Optuna's params, enough to rebuild the trial
    parameters: dict  # the method's own description
    scores: dict  # label -> {"refusals", "broken", "total", "kl", and "judged": {...} where a judge re-scored}
    settings: dict = field(default_factory=dict)
    recipe: dict = field(default_factory=dict)  # what rebuilds the weights (reproduce.py); empty: no reproduce.json
    capabilities: dict = field(default_factory=dict)  # task -> base and edited accuracy, paired difference
    usage: dict = field(default_factory=dict)  # a GGUF export: {"file", "name", "warning"} for the card


def save_merged(
    source: ModelSource,
    edits: Iterable[WriterEdit],
    tokenizer,
    output_dir: Path,
    max_shard_size: str,
    summary: TrialSummary,
    trust_remote_code: bool = False,
) -> Path:
    """Base weights plus each writer's edit (added in float32, cast back to the stored dtype).

    Streams tensor by tensor through the base's safetensors files where every edit maps onto
    a stored tensor; otherwise (renamed or fused keys, .bin checkpoints) loads the whole base.
    """
    with _staged(output_dir) as staging:
        edits_by_name = {parameter_name(edit.writer): edit for edit in edits}
        folder = _checkpoint_folder(source)
        checkpoint = Checkpoint.find(folder) if folder else None
        reason = _why_not_streamable(checkpoint, folder, edits_by_name)
        if reason is None:
            console.print(f"Merging shard by shard into [bold]{output_dir}[/]...")
            computes = {name: edit.compute for name, edit in edits_by_name.items()}
            stream_merge(checkpoint, computes, staging, max_shard_size)
            copy_model_files(folder, staging)
        else:
            console.print(f"[yellow]Merging in memory: {reason}.[/]")
            _merge_in_memory(source, list(edits_by_name.values()), staging, max_shard_size, trust_remote_code)
        tokenizer.save_pretrained(staging)
        _write_card(staging, source, summary, "model", snapshot=folder)
    return output_dir


def _checkpoint_folder(source: ModelSource) -> Path | None:
    """The local folder of the base checkpoint (a hub model comes from the download cache)."""
    if source.is_local:
        return Path(source.location)
    from huggingface_hub import snapshot_download

    try:
        patterns = ["*.safetensors", INDEX_NAME, *MODEL_FILE_PATTERNS]
        return Path(snapshot_download(source.location, revision=source.revision, allow_patterns=patterns))
    except Exception as error:  # offline, gated, no such revision: the in-memory merge reports it properly
        console.print(f"[yellow]Checkpoint files unavailable for streaming ({type(error).__name__}).[/]")
        return None


def _why_not_streamable(checkpoint: Checkpoint | None, folder: Path | None, edits: dict) -> str | None:
    if checkpoint is None:
        return "the base has no local safetensors checkpoint"
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    if "quantization_config" in config:
        return "the base checkpoint itself is quantized"
    for name, edit in edits.items():
        if reason := checkpoint.mismatch(name, edit.shape):
            return reason
    return None


def _merge_in_memory(
    source, edits: list[WriterEdit], output_dir: Path, max_shard_size: str, trust_remote_code: bool
) -> None:
    from transformers import AutoModelForCausalLM

    console.print("Loading the base model at full precision on the CPU to merge into...")
    base = AutoModelForCausalLM.from_pretrained(
        source.location,
        revision=source.revision,
        dtype="auto",
        device_map="cpu",
        trust_remote_code=trust_remote_code,
        use_safetensors=True,  # never pickled weights
    )
    with torch.no_grad(), track("merging", len(edits)) as advance:
        for edit in edits:
            module = base.get_submodule(edit.writer.path)
            parameter = getattr(module, edit.writer.parameter or "weight")
            parameter.copy_((parameter.float() + edit.compute().to(parameter.device)).to(parameter.dtype))
            advance(1)
    console.print("Saving the merged model...")
    base.save_pretrained(output_dir, max_shard_size=max_shard_size)
    del base


def save_adapter(source: ModelSource, adapter: Adapter, tokenizer, output_dir: Path, summary: TrialSummary) -> Path:
    with _staged(output_dir) as staging:
        adapter.model.peft_config[ADAPTER].base_model_name_or_path = source.name
        adapter.model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        _write_card(staging, source, summary, "adapter")
    return output_dir


def save_gguf(
    source: ModelSource,
    edits: Iterable[WriterEdit],
    tokenizer,
    output_dir: Path,
    gguf_type: str,
    summary: TrialSummary,
    system_prompt: str | None,
    score: Callable[[Path], dict] | None = None,
) -> Path:
    """The merged model as one GGUF file (see gguf_file.py), an Ollama Modelfile and the card;
    `score(file)`, if given, scores the written file: its score rows ("rows") and a warning where
    quantization lost the edit go on the card."""
    check_gguf_source(source)
    base_file = Path(source.gguf_file)
    with _staged(output_dir) as staging:
        name = f"{source.run_name}-{gguf_label(base_file, gguf_type)}.gguf"
        console.print(f"Writing [bold]{name}[/] ({gguf_type})...")
        write_gguf(base_file, edits, staging / name, gguf_type)
        write_modelfile(staging, name, tokenizer, system_prompt)
        shipped = score(staging / name) if score else {}
        scores = {**summary.scores, **shipped.get("rows", {})}
        usage = {"file": name, "name": source.run_name.lower(), "warning": shipped.get("warning")}
        _write_card(staging, source, replace(summary, scores=scores, usage=usage), "gguf")
    return output_dir / name


def check_gguf_source(source: ModelSource) -> None:
    """A GGUF export takes its metadata and layout from the GGUF file the model came in as."""
    if source.gguf_file is None:
        raise ApostateError(
            f"GGUF export needs a model that came in as a GGUF file ({source.name} did not); save the merged "
            "model and convert it with llama.cpp's convert_hf_to_gguf.py"
        )


def check_output_dir(path: Path) -> None:
    """Refuse, before any work, an output path no export can go to: a file (or a file above
    it), a mount point (it cannot be swapped), or a non-empty folder that is not an earlier export."""
    path = Path(path)
    blocker = next((p for p in (path, *path.parents) if os.path.lexists(p)), None)
    if blocker is not None and not blocker.is_dir():
        kind = "is a file" if blocker.is_file() else "exists and is not a folder"
        raise ApostateError(f"output path {blocker} {kind}; choose a folder path for --output-dir")
    if not path.is_dir():
        return  # created by the export
    if os.path.ismount(path):
        raise ApostateError(
            f"output folder {path} is a mount point, which cannot be replaced safely; "
            f"choose a folder inside it (e.g. {path / 'model'}) for --output-dir"
        )
    if any(path.iterdir()) and not (path / "apostate.json").is_file():
        raise ApostateError(
            f"output folder {path} is not empty and not an earlier apostate export; choose another --output-dir"
        )


@contextmanager
def _staged(output_dir: Path) -> Iterator[Path]:
    """A temporary sibling of `output_dir` to write the export into; it replaces `output_dir`
    only when the block completes. On any failure it is removed and `output_dir` is untouched."""
    output_dir = Path(os.path.abspath(output_dir))
    if output_dir.is_symlink():  # replace the folder it points to, keep the link
        output_dir = output_dir.resolve()
    check_output_dir(output_dir)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        _clean_up_killed_export(output_dir)
        staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; a plain mkdir would not
    except OSError as error:
        raise _write_error(output_dir, error) from error
    try:
        yield staging
        _swap_in(staging, output_dir)
    except BaseException as error:  # KeyboardInterrupt too: never leave the partial folder
        shutil.rmtree(staging, ignore_errors=True)
        if _os_errno(error) is not None and not isinstance(error, ApostateError):
            raise _write_error(output_dir, error) from error
        raise


def _clean_up_killed_export(output_dir: Path) -> None:
    """Undo what a killed export of `output_dir` left beside it: its partial folder, and the
    previous export moved aside but not yet replaced (a kill between `_swap_in`'s renames)."""
    for sibling in sorted(output_dir.parent.iterdir()):
        if sibling.name.startswith(f".{output_dir.name}.old-"):
            aside = sibling / output_dir.name
            if aside.is_dir() and not os.path.lexists(output_dir):
                aside.rename(output_dir)
                console.print(
                    f"[yellow]Put the previous export back in {output_dir} (a killed export had moved it aside).[/]"
                )
            shutil.rmtree(sibling, ignore_errors=True)
        elif sibling.name.startswith(f".{output_dir.name}.partial-"):
            shutil.rmtree(sibling, ignore_errors=True)


def _swap_in(staging: Path, output_dir: Path) -> None:
    """Move the previous export aside, rename the new one into place, then delete the old one."""
    if not os.path.lexists(output_dir):
        staging.rename(output_dir)
        return
    holder = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.old-", dir=output_dir.parent))
    aside = holder / output_dir.name
    output_dir.rename(aside)
    try:
        staging.rename(output_dir)
    except BaseException:
        aside.rename(output_dir)
        holder.rmdir()
        raise
    shutil.rmtree(holder, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _os_errno(error: BaseException) -> int | None:
    """The OS error code behind `error`: an OSError's, or the "(os error N)" that safetensors
    (Rust) reports in its message; None if it is not a system call's error."""
    if isinstance(error, OSError):
        return error.errno  # None for OSErrors raised by libraries with a message only
    match = re.search(r"\(os error (\d+)\)", str(error))
    return int(match.group(1)) if match else None


def _write_error(output_dir: Path, error: BaseException) -> ApostateError:
    code = _os_errno(error)
    filename = getattr(error, "filename", None)
    elsewhere = isinstance(filename, str) and not os.path.abspath(filename).startswith(str(output_dir.parent))
    if elsewhere:  # e.g. an unreadable base checkpoint file: name that file
        problem, fix = first_line(error), "fix that and export again"
    elif code in (errno.ENOSPC, errno.EDQUOT):
        problem, fix = "the disk is full", "free some space there or choose another --output-dir"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        problem, fix = "the folder is not writable (read-only?)", "choose a writable --output-dir"
    else:
        problem, fix = first_line(error), "fix that or choose another --output-dir"
    return ApostateError(f"export to {output_dir} failed: {problem}; {fix} (any previous export there is unchanged)")


def _write_card(output_dir: Path, source: ModelSource, summary: TrialSummary, export: str, snapshot=None) -> None:
    """The card and apostate.json; then reproduce.json, with the hashes of the weight files written."""
    write_card(output_dir, base_identity(source, snapshot), summary, export)
    if summary.recipe:
        write_record(output_dir, summary.recipe, export)
