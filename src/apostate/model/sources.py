"""Where a model's files are: a hub id, a local folder, a GGUF file (converted once), or the demo.

The result is a `ModelSource`: what to hand `from_pretrained`, and a short name for the run.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from apostate.errors import ApostateError, first_line

DEMO_NAME = "demo"
CONVERSION_SHARD_SIZE = "500MB"


@dataclass(frozen=True)
class ModelSource:
    """A loadable model location."""

    name: str  # what the user asked for (hub id, path, or 'demo')
    location: str  # hub id or folder that from_pretrained takes
    revision: str | None = None
    gguf_file: str | None = None  # the GGUF file it was converted from (the template of a GGUF export)

    @property
    def is_local(self) -> bool:
        return Path(self.location).is_dir()

    @property
    def run_name(self) -> str:
        """A folder name for runs of this model: one path component, never `.`, `..` or hidden,
        whatever the model's name holds (`../x`, absolute paths, `org/name`)."""
        base = Path(self.name).stem if self.name.lower().endswith(".gguf") else self.name.rstrip("/")
        if Path(base).is_absolute() or base.startswith("."):
            base = Path(os.path.abspath(base)).name
        return re.sub(r"[^A-Za-z0-9._-]+", "--", base).strip("-.") or "model"


def resolve_source(model: str, revision: str | None, cache_dir: Path) -> ModelSource:
    """Turn the user's model argument into a ModelSource, converting GGUF files on first use."""
    if model == DEMO_NAME:
        from apostate.model.demo import demo_gguf

        file = demo_gguf(cache_dir)
        return ModelSource(DEMO_NAME, str(converted_gguf(file, cache_dir)), gguf_file=str(file))
    path = Path(model).expanduser()
    if model.lower().endswith(".gguf"):
        if not path.is_file():
            raise ApostateError(f"GGUF file {model} does not exist")
        return ModelSource(model, str(converted_gguf(path, cache_dir)), gguf_file=str(path.resolve()))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ApostateError(f"folder {model} is not a model folder (it has no config.json)")
        return ModelSource(model, str(path))
    if looks_like_path(model):
        raise ApostateError(f"model folder {model} does not exist")
    return ModelSource(model, model, revision)


def looks_like_path(name: str) -> bool:
    """Hub ids (of models and datasets) are 'name' or 'org/name'; anything else is a path, on disk or mistyped."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def converted_gguf(gguf_path: Path, cache_dir: Path) -> Path:
    """A safetensors folder converted from `gguf_path`, made once and reused.

    The cache key covers the file's absolute path, size and modification time, so a
    replaced file is converted again. Conversion writes to a temporary folder and renames
    it into place, so an interrupted conversion never leaves a half-written cache.
    """
    stat = gguf_path.stat()
    identity = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERSION_SHARD_SIZE}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    target = cache_dir / "gguf" / f"{gguf_path.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    from rich.console import Console

    Console(stderr=True).print(f"Converting [bold]{gguf_path.name}[/] to safetensors (once; cached in {target})...")
    scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        convert_gguf(gguf_path, scratch)
        scratch.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary folder
        scratch.rename(target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def convert_gguf(gguf_path: Path, output: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Quantized GGUF weights are dequantized by transformers; float32 keeps them exact for
    # small files, bfloat16 keeps big ones at a sane size (their quantization error dominates).
    dtype = torch.float32 if gguf_path.stat().st_size <= 2 * 1024**3 else torch.bfloat16
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as error:
        reason = first_line(error).rstrip(".")
        raise ApostateError(f"cannot read GGUF file {gguf_path}: {reason}; download the file again") from None
    # A GGUF-loaded model remembers its quantizer; saving needs it gone.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Small shards: loading maps one file at a time, and a 4-bit load touches (so keeps
    # resident) every page of a mapped file; one 2.5 GB file cost the demo 2 GB of RSS.
    model.save_pretrained(output, max_shard_size=CONVERSION_SHARD_SIZE)
    tokenizer.save_pretrained(output)
