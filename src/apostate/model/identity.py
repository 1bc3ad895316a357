"""What the base model is, for a model card: its hub id, revision and license, wherever it came from.

- a hub id: the id itself, the commit of the downloaded snapshot, and the license from the hub's
  model card (the local download cache first; no network needed if it is there);
- a GGUF file: the metadata GGUF writers record (`general.base_model.0.*`, `general.license`);
- a model folder: the YAML header of its README.md (`base_model`, `license`);
- the demo: Qwen/Qwen2.5-Coder-0.5B-Instruct, the model its verified GGUF was made from.

Everything here is best effort: what cannot be found is None, and the card leaves it out.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path

from apostate.model.sources import DEMO_NAME, ModelSource

DEMO_IDENTITY = {"hub_id": "Qwen/Qwen2.5-Coder-0.5B-Instruct", "license": "apache-2.0"}
HUB_URL = re.compile(r"https?://huggingface\.co/([\w.-]+/[\w.-]+)")


@dataclass(frozen=True)
class BaseIdentity:
    name: str  # for people: the hub id, or the model's own name
    hub_id: str | None = None  # "org/name" on the Hugging Face hub, when known
    revision: str | None = None  # a commit, where one is known
    license: str | None = None  # a hub license id ("apache-2.0"), or the license's name
    file: str | None = None  # the GGUF file the weights were converted from

    def as_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if value is not None}


def base_identity(source: ModelSource, snapshot: Path | None = None) -> BaseIdentity:
    """`snapshot`: the local folder a hub model was read from (its name is the commit)."""
    if source.name == DEMO_NAME:
        from apostate.model.demo import DEMO_FILE, DEMO_SHA256

        hub_id = DEMO_IDENTITY["hub_id"]
        return BaseIdentity(hub_id, hub_id, None, DEMO_IDENTITY["license"], f"{DEMO_FILE} (sha256 {DEMO_SHA256})")
    if source.name.lower().endswith(".gguf"):
        return _gguf_identity(Path(source.name))
    if source.is_local:
        return _folder_identity(Path(source.location), source.name)
    revision = source.revision
    if snapshot is not None and re.fullmatch(r"[0-9a-f]{40}", snapshot.name):
        revision = snapshot.name
    return BaseIdentity(source.name, source.name, revision, _hub_license(source))


def _gguf_identity(path: Path) -> BaseIdentity:
    fields = _gguf_general_fields(path)
    url = fields.get("general.base_model.0.repo_url") or fields.get("general.repo_url") or ""
    match = HUB_URL.match(url)
    hub_id = match.group(1) if match else None
    if hub_id is None and fields.get("general.base_model.0.organization") and fields.get("general.base_model.0.name"):
        hub_id = f"{fields['general.base_model.0.organization']}/{fields['general.base_model.0.name']}"
    name = hub_id or _gguf_model_name(fields) or path.stem
    return BaseIdentity(name, hub_id, None, fields.get("general.license"), path.name)


def _gguf_model_name(fields: dict) -> str | None:
    """'Qwen2.5-Coder-1.5B-Instruct' from basename, size label and fine-tune (less a trailing '-GGUF')."""
    parts = [fields.get(key) for key in ("general.basename", "general.size_label", "general.finetune")]
    if not parts[0]:
        return fields.get("general.name")
    name = "-".join(str(part) for part in parts if part)
    return re.sub(r"-(GGUF|AWQ|GPTQ)$", "", name, flags=re.IGNORECASE)


def _gguf_general_fields(path: Path) -> dict[str, str]:
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        fields = {}
        for key, field in reader.fields.items():
            if key.startswith("general."):
                value = field.contents()
                if isinstance(value, (str, int, float)):
                    fields[key] = str(value)
        return fields
    except Exception:  # no gguf package, an odd file: the card says less
        return {}


def _folder_identity(folder: Path, name: str) -> BaseIdentity:
    header = card_header(folder / "README.md")
    base = header.get("base_model")
    hub_id = base[0] if isinstance(base, list) and base else base if isinstance(base, str) else None
    license_ = header.get("license")
    return BaseIdentity(Path(name).name, hub_id, None, license_ if isinstance(license_, str) else None)


def card_header(readme: Path) -> dict:
    """The YAML header of a model card (README.md), or {}."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    match = re.match(r"---\s*\n(.*?)\n---\s*\n", text, re.DOTALL)
    if not match:
        return {}
    import yaml

    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _hub_license(source: ModelSource) -> str | None:
    """The license in the hub model's card: from the download cache, else (online) from the hub."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(source.location, "README.md", revision=source.revision)
    if not isinstance(cached, str):
        try:
            cached = hf_hub_download(source.location, "README.md", revision=source.revision, etag_timeout=5)
        except Exception:  # offline, gated, no card: the card leaves the license out
            return None
    license_ = card_header(Path(cached)).get("license")
    return license_ if isinstance(license_, str) else None
