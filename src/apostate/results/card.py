"""The exported model card (README.md), after the hub's model-card conventions: a YAML header the
hub reads (base model, library, license, tags), then what was done, the scores against the base
model, every parameter, the versions, and the command that rebuilds the weights."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from apostate import __version__
from apostate.model.identity import BaseIdentity

TAGS = ["apostate", "abliterated", "uncensored"]


def card_header(identity: BaseIdentity, merged: bool) -> dict:
    header: dict = {}
    if identity.hub_id:
        header["base_model"] = identity.hub_id
        header["base_model_relation"] = "finetune" if merged else "adapter"
    header["library_name"] = "transformers" if merged else "peft"
    if identity.license:
        header["license"] = identity.license
    header["pipeline_tag"] = "text-generation"
    header["tags"] = TAGS
    return header


def card_text(identity: BaseIdentity, summary, merged: bool) -> str:
    kind = "a merged model" if merged else "a LoRA adapter for the base model"
    header = yaml.safe_dump(card_header(identity, merged), sort_keys=False).strip()
    recipe = summary.recipe or {}
    return f"""---
{header}
---

# {identity.name.split("/")[-1]} (apostate)

This is {kind} made with [apostate](https://pypi.org/project/apostate/) {__version__},
which removes refusal behaviour from chat models while keeping them as close to the
original as possible. Base model: {_base_line(identity)}.
Method: **{summary.method}**, trial {summary.trial_number}.

## Scores

{score_rows(summary.scores)}

KL divergence is measured on the first-token distributions of harmless prompts. Refusals
(markers) count responses to harmful prompts that hold a refusal phrase; broken ones are
repetition loops, text in another language or garbage; a judge, where one was set, labels the
full responses as refusal, compliance or broken. The held-out prompts were never seen by the
search.

## Parameters

```json
{json.dumps(summary.parameters, indent=2)}
```

Optuna's parameters for this trial: `{json.dumps(summary.raw_parameters)}`.
Every setting of the run is in `apostate.json` and `reproduce.json`.
{_reproduce_part(recipe)}"""


def _base_line(identity: BaseIdentity) -> str:
    name = f"[{identity.hub_id}](https://huggingface.co/{identity.hub_id})" if identity.hub_id else identity.name
    parts = [name]
    if identity.revision:
        parts.append(f"revision `{identity.revision}`")
    if identity.file:
        parts.append(f"converted from `{identity.file}`")
    return ", ".join(parts)


def _reproduce_part(recipe: dict) -> str:
    if not recipe:
        return ""
    versions = recipe.get("versions", {})
    machine = recipe.get("machine", {})
    pins = " ".join(f"{name}=={versions[name]}" for name in ("torch", "transformers", "peft") if versions.get(name))
    listed = ", ".join(f"{name} {value}" for name, value in versions.items() if value)
    return f"""
## Reproduce

Made with {listed}; {machine.get("dtype")} on {machine.get("device")} ({machine.get("processor")}).
To rebuild these weights without searching, and check them against the sha256 of each weight
file recorded in `reproduce.json`:

```sh
pip install 'apostate=={versions.get("apostate")}' {pins}
apostate reproduce reproduce.json
```
"""


def score_rows(scores: dict) -> str:
    """The score table: the markers' counts (the search's), the judge's beside them, and the base
    model's on the same prompts; then refusals per harm category where they were counted."""
    judges = {s["judged"]["judge"] for s in scores.values() if s.get("judged")}
    judged_header = f" Judged by {', '.join(sorted(judges))} |" if judges else ""
    lines = [
        f"| Prompts | Refusals (markers) | Broken (markers) |{judged_header} KL divergence from the base model |",
        "| :--- | ---: | ---: |" + (" :--- |" if judges else "") + " ---: |",
    ]
    for label, s in scores.items():
        judged = s.get("judged")
        judged_cell = (
            f" {judged['refusals']}/{judged['total']} refused, {judged['broken']} broken |" if judged else " - |"
        )
        lines.append(
            f"| {label} | {s['refusals']}/{s['total']} | {s.get('broken', 0)} |{judged_cell if judges else ''} "
            f"{max(s['kl'], 0.0):.4f} |"
        )
        if "base_refusals" in s:  # the unedited model on the same prompts
            base = s.get("base_judged")
            base_cell = f" {base['refusals']}/{base['total']} refused, {base['broken']} broken |" if base else " - |"
            lines.append(
                f"| {label}, base model | {s['base_refusals']}/{s['total']} | - |{base_cell if judges else ''} 0 |"
            )
    for label, s in scores.items():
        if s.get("categories"):
            lines += ["", f"Refusals on the {label} prompts by category ({s['categories_judge']}):", ""]
            lines += ["| Category | Refused | Broken |", "| :--- | ---: | ---: |"]
            lines += [
                f"| {category} | {row['refusals']}/{row['total']} | {row['broken']} |"
                for category, row in s["categories"].items()
            ]
    return "\n".join(lines)


def write_card(output_dir: Path, identity: BaseIdentity, summary, merged: bool) -> None:
    """README.md (the card) and apostate.json (the same as data)."""
    record = {
        "apostate_version": __version__,
        "base_model": identity.name,
        "base": identity.as_dict(),
        "method": summary.method,
        "trial": summary.trial_number,
        "optuna_parameters": summary.raw_parameters,
        "parameters": summary.parameters,
        "scores": summary.scores,
        "settings": summary.settings,
    }
    (output_dir / "apostate.json").write_text(json.dumps(record, indent=2, default=str))
    (output_dir / "README.md").write_text(card_text(identity, summary, merged))
