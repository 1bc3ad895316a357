"""Export a chosen trial: the merged full model, or the adapter alone, with a model card and
the exact parameters needed to reproduce it.

The merged model is built from a fresh full-precision copy of the base on the CPU, never
from the live (possibly quantized) model: each writer gets its edit B @ A added in float32
and cast back to the checkpoint's dtype, so the saved weights are the weights that were scored.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .adapter import ADAPTER, Adapter
from .architecture import ResidualWriter
from .progress import console, track
from .sources import ModelSource


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
    deltas: list[tuple[ResidualWriter, torch.Tensor]],
    tokenizer,
    output_dir: Path,
    max_shard_size: str,
    summary: TrialSummary,
    trust_remote_code: bool = False,
) -> Path:
    """Base weights plus `deltas` (each writer's edit, float32, in its parameter's layout)."""
    from transformers import AutoModelForCausalLM

    output_dir = _fresh_dir(output_dir)
    console.print("Loading the base model at full precision on the CPU to merge into...")
    base = AutoModelForCausalLM.from_pretrained(
        source.location, revision=source.revision, dtype="auto", device_map="cpu", trust_remote_code=trust_remote_code
    )
    with torch.no_grad(), track("merging", len(deltas)) as advance:
        for writer, delta in deltas:
            module = base.get_submodule(writer.path)
            parameter = getattr(module, writer.parameter or "weight")
            delta = delta.to(parameter.device)
            parameter.copy_((parameter.float() + delta).to(parameter.dtype))
            advance(1)
    console.print(f"Saving the merged model to [bold]{output_dir}[/]...")
    base.save_pretrained(output_dir, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(output_dir)
    _write_card(output_dir, source, summary, merged=True)
    del base
    return output_dir


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
            from .errors import ApostateError

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
