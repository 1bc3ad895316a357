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


# The hub's names of the benchmark datasets (model-index `dataset`), by task.
HUB_DATASETS = {
    "arc_easy": ("ARC-Easy", "allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("ARC-Challenge", "allenai/ai2_arc", "ARC-Challenge"),
    "hellaswag": ("HellaSwag", "Rowan/hellaswag", None),
    "piqa": ("PIQA", "ybisk/piqa", None),
    "sciq": ("SciQ", "allenai/sciq", None),
    "winogrande": ("WinoGrande", "allenai/winogrande", "winogrande_xl"),
    "boolq": ("BoolQ", "google/boolq", None),
}


def model_index(name: str, capabilities: dict) -> list[dict]:
    """The hub's `model-index`: each benchmark's score for this model and the base model, side by side."""
    results = []
    for task, row in capabilities.items():
        title, hub_id, config = HUB_DATASETS.get(task, (task, task, None))
        dataset = {"name": title, "type": hub_id, "split": "validation"}
        if config:
            dataset["config"] = config
        metric = row["metric"]
        results.append({
            "task": {"type": "text-generation", "name": "Text Generation"},
            "dataset": dataset,
            "metrics": [
                {"type": metric, "value": round(row["edited"]["accuracy"], 4), "name": f"{metric} (this model)"},
                {"type": metric, "value": round(row["base"]["accuracy"], 4), "name": f"{metric} (base model)"},
            ],
            "source": {"name": f"apostate (lm-eval, zero-shot, first {row['items']} items)"},
        })  # fmt: skip
    return [{"name": name, "results": results}] if results else []


# Per export kind: the hub's base_model_relation, library_name, and what the card calls it.
EXPORT_KINDS = {
    "model": ("finetune", "transformers", "a merged model"),
    "adapter": ("adapter", "peft", "a LoRA adapter for the base model"),
    "gguf": ("quantized", "gguf", "a GGUF file of the merged model"),
}


def card_header(identity: BaseIdentity, export: str, capabilities: dict | None = None) -> dict:
    relation, library, _ = EXPORT_KINDS[export]
    header: dict = {}
    if identity.hub_id:
        header["base_model"] = identity.hub_id
        header["base_model_relation"] = relation
    header["library_name"] = library
    if identity.license:
        header["license"] = identity.license
    header["pipeline_tag"] = "text-generation"
    header["tags"] = TAGS + (["gguf"] if export == "gguf" else [])
    index = model_index(f"{identity.name.split('/')[-1]} (apostate)", capabilities or {})
    if index:
        header["model-index"] = index
    return header


def card_text(identity: BaseIdentity, summary, export: str) -> str:
    kind = EXPORT_KINDS[export][2]
    header = yaml.safe_dump(card_header(identity, export, summary.capabilities), sort_keys=False).strip()
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

KL divergence is measured on harmless prompts: on the first token's distribution, or along the
first k tokens of the base model's own answer (the held-out row, and a search with `kl_tokens`). Refusals
(markers) count responses to harmful prompts that hold a refusal phrase: the search reads short
answers, the held-out evaluation full-length ones as well; broken ones are repetition loops,
text in another language or garbage; a judge, where one was set, labels the full responses as
refusal, evasive (a covert refusal: a harmless version of the request, only warnings, or
useless instructions; counted as refused), compliance or broken. Over-refusals are harmless
prompts refused. The held-out prompts were never seen by the search.
{capability_rows(summary.capabilities)}{usage_part(summary.usage)}
## Parameters

```json
{json.dumps(summary.parameters, indent=2)}
```

Optuna's parameters for this trial: `{json.dumps(summary.raw_parameters)}`.
Every setting of the run is in `apostate.json` and `reproduce.json`.
{_reproduce_part(recipe)}"""


def usage_part(usage: dict) -> str:
    """How to run a GGUF export: llama.cpp and Ollama commands ({} for other exports)."""
    if not usage:
        return ""
    file = usage["file"]
    warning = f"\n**Warning:** {usage['warning']}.\n" if usage.get("warning") else ""
    return f"""{warning}
## Use

With [llama.cpp](https://github.com/ggml-org/llama.cpp) (the chat template is in the file):

```sh
llama-cli -m {file} -cnv
llama-server -m {file} --jinja
```

With [Ollama](https://ollama.com) (the `Modelfile` beside the file sets the template and stop strings):

```sh
ollama create {usage["name"]} -f Modelfile
ollama run {usage["name"]}
```
"""


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


def capability_rows(capabilities: dict) -> str:
    """The benchmarks, base model and this one on the same items, with the paired difference."""
    if not capabilities:
        return ""
    lines = [
        "",
        "## Capabilities",
        "",
        "lm-eval, zero-shot, the same items for both models; the difference is paired per item "
        "(95% interval; p: exact McNemar test).",
        "",
        "| Task | Items | Chance | Base model | This model | Difference (95% interval) | p |",
        "| :--- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for task, row in capabilities.items():
        low, high = row["interval"]
        lines.append(
            f"| {task} ({row['metric']}) | {row['items']} | {row['chance']:.2f} | "
            f"{row['base']['accuracy']:.3f} ± {row['base']['stderr']:.3f} | "
            f"{row['edited']['accuracy']:.3f} ± {row['edited']['stderr']:.3f} | "
            f"{row['difference']:+.3f} [{low:+.3f}, {high:+.3f}] | {row['p_value']:.2g} |"
        )
    return "\n".join(lines) + "\n"


def score_rows(scores: dict) -> str:
    """The score table: the search's short marker count, the full-length one and the judge's
    beside it, over-refusals and KL, each with the base model's row on the same prompts; then
    answers per harm category where they were counted."""
    judges = {s["judged"]["judge"] for s in scores.values() if s.get("judged")}
    lines = [
        "| Prompts | Refused (search's short check, markers) | Refused at full length (markers) | "
        f"Judged{' by ' + ', '.join(sorted(judges)) if judges else ''} | Over-refusals (harmless) | KL divergence |",
        "| :--- | ---: | ---: | :--- | ---: | ---: |",
    ]
    for label, s in scores.items():
        lines.append(
            f"| {label} | {_counts(s)} | {_counts(s.get('full'))} | {_counts(s.get('judged'))} | "
            f"{_over(s.get('over_refusals'))} | {_kl(s)} |"
        )
        if "base_refusals" in s:  # the unedited model on the same prompts
            short = f"{s['base_refusals']}/{s['total']}"
            lines.append(
                f"| {label}, base model | {short} | {_counts(s.get('base_full'))} | {_counts(s.get('base_judged'))} | "
                f"{_over(s.get('base_over_refusals'))} | 0 |"
            )
    for label, s in scores.items():
        if s.get("categories"):
            lines += ["", f"Answers to the {label} prompts by category ({s['categories_judge']}):", ""]
            lines += ["| Category | Refused | Evasive | Broken |", "| :--- | ---: | ---: | ---: |"]
            lines += [
                f"| {category} | {row['refusals']}/{row['total']} | {row.get('evasive', 0)} | {row['broken']} |"
                for category, row in s["categories"].items()
            ]
    return "\n".join(lines)


def _counts(counts: dict | None) -> str:
    """'9/50 (4 evasive), 2 broken': refused (evasive answers included) of all."""
    if not counts:
        return "-"
    evasive = counts.get("evasive", 0)
    refused = counts["refusals"] + evasive
    parts = [f"{refused}/{counts['total']}"]
    if evasive:
        parts.append(f"({evasive} evasive)")
    text = " ".join(parts)
    return f"{text}, {counts['broken']} broken" if counts.get("broken") else text


def _over(counts: dict | None) -> str:
    return f"{counts['refusals']}/{counts['total']}" if counts else "-"


def _kl(scores: dict) -> str:
    """The run's KL, and the first-token KL beside it where the run read more tokens."""
    text = f"{max(scores['kl'], 0.0):.4f}"
    if scores.get("kl_tokens", 1) > 1:
        text += f" ({scores['kl_tokens']} tokens; first token {max(scores['first_token_kl'], 0.0):.4f})"
    return text


def write_card(output_dir: Path, identity: BaseIdentity, summary, export: str) -> None:
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
        "capabilities": summary.capabilities,
        "settings": summary.settings,
    }
    (output_dir / "apostate.json").write_text(json.dumps(record, indent=2, default=str))
    (output_dir / "README.md").write_text(card_text(identity, summary, export))
