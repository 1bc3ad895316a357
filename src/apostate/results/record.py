"""What an export records to be rebuilt without searching (`reproduce.json`), and comparing a
rebuild's record with it: the versions and machine it was made with, all settings, the trial's
parameters, the start-up quantities a search measures by timing or sampling (batch size,
response prefix), the sha256 of each prompt split and of the refusal directions, and the sha256
of each weight file written. `apostate reproduce` (commands/reproduce.py) rebuilds from it.
"""

from __future__ import annotations

import hashlib
import json
import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from apostate.errors import ApostateError
from apostate.nested import changed_keys, flat

FILE_NAME = "reproduce.json"
FORMAT = 1
PACKAGES = ("apostate", "torch", "transformers", "peft", "safetensors", "optuna")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
# Where a run keeps things and what it does after the search: not part of what the weights are.
NOT_RECIPE = {
    "config", "run_dir", "output_dir", "cache_dir", "trial", "actions", "headless", "show_results",
    "evaluate_model", "debug", "judge", "upload", "pick_max_kl", "n_trials", "n_startup_trials", "seed",
    "storage", "study_name", "heartbeat_seconds",
}  # fmt: skip


def package_versions() -> dict[str, str | None]:
    versions = {"python": platform.python_version()}
    for package in PACKAGES:
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return versions


def machine(device, dtype, quantized: bool) -> dict:
    """The arithmetic the weights came from: device, dtype, processor."""
    import torch

    return {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "quantized": quantized,
        "processor": processor_name(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


def processor_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def prompt_hashes(prompts) -> dict[str, str]:
    return prompts.sha256()


def tensor_hash(tensor) -> str:
    return hashlib.sha256(tensor.detach().float().contiguous().cpu().numpy().tobytes()).hexdigest()


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each weight file in an export folder, by file name."""
    hashes = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.suffix in WEIGHT_SUFFIXES:
            digest = hashlib.sha256()
            with path.open("rb") as handle:
                while chunk := handle.read(1 << 24):
                    digest.update(chunk)
            hashes[path.name] = digest.hexdigest()
    return hashes


def write_record(folder: Path, record: dict, export: str) -> None:
    """reproduce.json in a finished export folder: the recipe plus the hashes of what was written."""
    data = {**record, "export": export, "files_sha256": file_hashes(folder)}
    (folder / FILE_NAME).write_text(json.dumps(data, indent=2))


def read_record(path: Path) -> tuple[dict, Path]:
    """The record and the export folder it describes."""
    file = path / FILE_NAME if path.is_dir() else path
    if not file.is_file():
        where = f"folder {path} has no {FILE_NAME}" if path.is_dir() else f"{path} does not exist"
        raise ApostateError(f"{where}; give an apostate export folder or its {FILE_NAME}")
    try:
        record = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ApostateError(f"{file} is not valid JSON; give the {FILE_NAME} an apostate export wrote") from None
    missing = [key for key in ("settings", "parameters", "startup", "files_sha256") if key not in record]
    if not isinstance(record, dict) or missing:
        raise ApostateError(f"{file} is not an apostate reproduce file (missing: {', '.join(missing)})")
    return record, file.parent


def differences(record: dict, rebuilt: dict) -> list[str]:
    """What differs between the recorded run and the rebuild, most likely causes first."""
    found = []
    for kind in ("versions", "machine"):
        for key in sorted(set(record.get(kind, {})) | set(rebuilt.get(kind, {}))):
            before, now = record.get(kind, {}).get(key), rebuilt.get(kind, {}).get(key)
            if before != now:
                found.append(f"{key}: {before} -> {now}")
    recorded_settings, rebuilt_settings = flat(record["settings"]), flat(rebuilt["settings"])
    for key in changed_keys(record["settings"], rebuilt["settings"]):
        if key.split(".")[0] in NOT_RECIPE or key in ("batch_size", "response_prefix", "model"):
            continue
        found.append(f"setting {key}: {recorded_settings.get(key)!r} -> {rebuilt_settings.get(key)!r}")
    for split, digest in record.get("prompts_sha256", {}).items():
        if rebuilt["prompts_sha256"].get(split) != digest:
            found.append(f"prompts {split} differ")
    if record.get("directions_sha256") and record["directions_sha256"] != rebuilt["directions_sha256"]:
        found.append("the refusal directions differ (computed from the model and prompts, before any edit)")
    return found
