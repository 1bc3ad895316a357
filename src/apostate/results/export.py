"""Export a chosen trial: the merged full model, or the adapter alone, with a model card and
the exact parameters needed to reproduce it.

The merged model is built from a fresh full-precision copy of the base on the CPU, never
from the live (possibly quantized) model: each writer gets its edit B @ A added in float32
and cast back to the checkpoint's dtype, so the saved weights are the weights that were scored.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..model.adapter import ADAPTER, Adapter
from ..model.architecture import WriterEdit
from ..model.sources import ModelSource
from ..progress import console, track
from .merge import INDEX_NAME, MODEL_FILE_PATTERNS, Checkpoint, copy_model_files, parameter_name, stream_merge


@dataclass
class TrialSummary:
    """What a model card and apostate.json say about the exported trial."""

    method: str
    trial_number: int
    raw_parameters: dict  # Optuna's params, enough to rebuild the trial
    parameters: dict  # the method's own description
    scores: dict  # label -> {"refusals", "total", "kl"}
    settings: dict = field(default_factory=dict)


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
    output_dir = _fresh_dir(output_dir)
    edits_by_name = {parameter_name(edit.writer): edit for edit in edits}
    folder = _checkpoint_folder(source)
    checkpoint = Checkpoint.find(folder) if folder else None
    reason = _why_not_streamable(checkpoint, folder, edits_by_name)
    if reason is None:
        console.print(f"Merging shard by shard into [bold]{output_dir}[/]...")
        computes = {name: edit.compute for name, edit in edits_by_name.items()}
        stream_merge(checkpoint, computes, output_dir, max_shard_size)
        copy_model_files(folder, output_dir)
    else:
        console.print(f"[yellow]Merging in memory: {reason}.[/]")
        _merge_in_memory(source, list(edits_by_name.values()), output_dir, max_shard_size, trust_remote_code)
    tokenizer.save_pretrained(output_dir)
    _write_card(output_dir, source, summary, merged=True)
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
        source.location, revision=source.revision, dtype="auto", device_map="cpu", trust_remote_code=trust_remote_code
    )
    with torch.no_grad(), track("merging", len(edits)) as advance:
        for edit in edits:
            module = base.get_submodule(edit.writer.path)
            parameter = getattr(module, edit.writer.parameter or "weight")
            parameter.copy_((parameter.float() + edit.compute().to(parameter.device)).to(parameter.dtype))
            advance(1)
    console.print(f"Saving the merged model to [bold]{output_dir}[/]...")
    base.save_pretrained(output_dir, max_shard_size=max_shard_size)
    del base


def save_adapter(source: ModelSource, adapter: Adapter, tokenizer, output_dir: Path, summary: TrialSummary) -> Path:
    output_dir = _fresh_dir(output_dir)
    adapter.model.peft_config[ADAPTER].base_model_name_or_path = source.name
    adapter.model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    _write_card(output_dir, source, summary, merged=False)
    return output_dir


def _fresh_dir(path: Path) -> Path:
    """An empty output folder; an earlier export there is replaced, anything else is kept safe."""
    if path.exists() and any(path.iterdir()):
        if not (path / "apostate.json").is_file():
            from ..errors import ApostateError

            raise ApostateError(f"output folder {path} is not empty and not an earlier apostate export; choose another")
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_card(output_dir: Path, source: ModelSource, summary: TrialSummary, merged: bool) -> None:
    record = {
        "apostate_version": __version__,
        "base_model": source.name,
        "base_model_revision": source.revision,
        "method": summary.method,
        "trial": summary.trial_number,
        "optuna_parameters": summary.raw_parameters,
        "parameters": summary.parameters,
        "scores": summary.scores,
        "settings": summary.settings,
    }
    (output_dir / "apostate.json").write_text(json.dumps(record, indent=2, default=str))
    (output_dir / "README.md").write_text(_card_text(source, summary, merged))


def _card_text(source: ModelSource, summary: TrialSummary, merged: bool) -> str:
    rows = "\n".join(
        f"| {label} | {s['refusals']}/{s['total']} | {s['kl']:.4f} |" for label, s in summary.scores.items()
    )
    kind = "a merged model" if merged else "a LoRA adapter for the base model"
    base_line = f"base_model: {source.name}\n" if source.name != "demo" else ""
    return f"""---
{base_line}tags:
- apostate
- abliterated
- uncensored
---

# {Path(source.name).name} (apostate)

This is {kind} made with [apostate](https://pypi.org/project/apostate/) {__version__},
which removes refusal behaviour from chat models while keeping them as close to the
original as possible. Method: **{summary.method}**, trial {summary.trial_number}.

| Evaluation | Refusals | KL divergence from the base model |
| :--- | ---: | ---: |
{rows}

KL divergence is measured on the first-token distributions of harmless prompts.
The exact parameters and settings are in `apostate.json`.

## Parameters

```json
{json.dumps(summary.parameters, indent=2)}
```
"""
