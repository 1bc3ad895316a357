"""Rebuild an export without searching: `apostate reproduce FOLDER_OR_FILE`.

Every export holds `reproduce.json`: the versions and machine it was made with, all settings, the
trial's parameters, the start-up quantities a search measures by timing or sampling (batch size,
response prefix), the sha256 of each prompt split and of the refusal directions, and the sha256
of each weight file written. The rest of the start-up (refusal directions, ARA's captured
activations) is recomputed from the model and prompts, exactly as the run computed it.

Reproducing loads the model, recomputes the directions, applies the recorded parameters and saves
the export again; then it compares the weight files' hashes. Where they differ, it names what
differs between the two runs (versions, dtype, device, settings, prompts, directions) rather than
only saying that the files do.
"""

from __future__ import annotations

import hashlib
import json
import platform
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import tomli_w

from ..errors import ApostateError
from ..progress import console
from ..settings import OneLineArgumentParser

FILE_NAME = "reproduce.json"
FORMAT = 1
PACKAGES = ("apostate", "torch", "transformers", "peft", "safetensors", "optuna")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# Where a run keeps things and what it does after the search: not part of what the weights are.
NOT_RECIPE = {
    "config", "run_dir", "output_dir", "cache_dir", "trial", "actions", "headless", "show_results",
    "evaluate_model", "debug", "judge", "upload", "pick_max_kl", "n_trials", "n_startup_trials", "seed",
    "storage", "study_name", "heartbeat_seconds",
}  # fmt: skip


def recipe(session, trial) -> dict:
    """What rebuilds `trial` of `session` without searching (the weight hashes come at export)."""
    settings = session.settings
    loaded = session.loaded
    return {
        "format": FORMAT,
        "versions": package_versions(),
        "machine": machine(loaded.device, loaded.dtype, loaded.quantized),
        "model": settings.model,
        "settings": settings.model_dump(mode="json", exclude={"config", "storage"}),
        "method": settings.method,
        "trial": trial.number,
        "parameters": dict(trial.params),
        "startup": {"batch_size": session.startup.batch_size, "response_prefix": session.startup.response_prefix},
        "prompts_sha256": prompt_hashes(session.texts.prompts),
        "directions_sha256": tensor_hash(session.startup.directions),
    }


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


def settings_for(record: dict, overrides: list[str], output_dir: Path):
    """The run's settings, as recorded, with the start-up quantities it measured and any `overrides`
    (setting flags) on top; headless, no judge, saving into `output_dir`."""
    from ..settings import parse_command_line

    stored = {
        key: value
        for key, value in record["settings"].items()
        if key not in NOT_RECIPE | {"model"} and value is not None
    }
    stored["batch_size"] = record["startup"]["batch_size"]
    if record["startup"]["response_prefix"] is not None:
        stored["response_prefix"] = record["startup"]["response_prefix"]
    with tempfile.TemporaryDirectory(prefix="apostate-reproduce-") as scratch:
        config = Path(scratch) / "recorded.toml"
        config.write_text(tomli_w.dumps(_drop_none(stored)))
        flags = ["--config", str(config), "--output-dir", str(output_dir)]
        return parse_command_line([record["model"], *flags, *overrides])


def _drop_none(value):
    if isinstance(value, dict):
        return {key: _drop_none(item) for key, item in value.items() if item is not None}
    return value


def differences(record: dict, rebuilt: dict) -> list[str]:
    """What differs between the recorded run and the rebuild, most likely causes first."""
    found = []
    for kind in ("versions", "machine"):
        for key in sorted(set(record.get(kind, {})) | set(rebuilt.get(kind, {}))):
            before, now = record.get(kind, {}).get(key), rebuilt.get(kind, {}).get(key)
            if before != now:
                found.append(f"{key}: {before} -> {now}")
    recorded_settings, rebuilt_settings = _flat(record["settings"]), _flat(rebuilt["settings"])
    for key in sorted(set(recorded_settings) | set(rebuilt_settings)):
        if key.split(".")[0] in NOT_RECIPE or key in ("batch_size", "response_prefix", "model"):
            continue
        if recorded_settings.get(key) != rebuilt_settings.get(key):
            found.append(f"setting {key}: {recorded_settings.get(key)!r} -> {rebuilt_settings.get(key)!r}")
    for split, digest in record.get("prompts_sha256", {}).items():
        if rebuilt["prompts_sha256"].get(split) != digest:
            found.append(f"prompts {split} differ")
    if record.get("directions_sha256") and record["directions_sha256"] != rebuilt["directions_sha256"]:
        found.append("the refusal directions differ (computed from the model and prompts, before any edit)")
    return found


def _flat(data: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def main(argv: list[str]) -> int:
    """`apostate reproduce FOLDER_OR_FILE [--output-dir DIR] [setting flags]`: exit 0 when every
    weight file's hash matches the recorded one, 1 when one differs."""
    parser = OneLineArgumentParser(
        prog="apostate reproduce",
        description="Rebuild an apostate export from its reproduce.json, without searching, and check "
        "its weight files' sha256. Setting flags after the path override the recorded settings.",
    )
    parser.add_argument("path", type=Path, help="an export folder, or its reproduce.json")
    parser.add_argument("--output-dir", type=Path, help="where to rebuild (default: <folder>-reproduced)")
    args, overrides = parser.parse_known_args(argv)
    record, folder = read_record(args.path)
    output_dir = args.output_dir or folder.with_name(f"{folder.name}-reproduced")
    if output_dir.resolve() == folder.resolve():
        raise ApostateError(f"--output-dir {output_dir} is the export being reproduced; choose another folder")
    settings = settings_for(record, overrides, output_dir)
    rebuilt = rebuild(settings, record, folder, output_dir)
    return report(record, rebuilt)


def rebuild(settings, record: dict, folder: Path, output_dir: Path) -> dict:
    """Load, recompute the directions, apply the recorded parameters, export; the new record."""
    import optuna

    from ..model.loading import check_model
    from ..model.sources import resolve_source
    from ..monitor import PhaseMonitor
    from ..pipeline import build_method, load_editable
    from ..prompts import Texts, load_prompt_splits
    from ..search.startup import measure_directions
    from ..search.startup_checks import fit_to_context, model_context
    from .export import TrialSummary, save_adapter, save_merged

    source = resolve_source(settings.model, settings.model_revision, settings.cache_path())
    settings = check_model(source, settings, interactive=False)
    prompts = load_prompt_splits(settings)
    monitor = PhaseMonitor()
    with tempfile.TemporaryDirectory(prefix="apostate-reproduce-run-") as run_dir:
        editable = load_editable(source, settings, Path(run_dir))
    try:
        model, device = editable.adapter.model, editable.loaded.device
        prompts = fit_to_context(editable.tokenizer, settings, prompts, model_context(model))  # as the run did
        texts = Texts(editable.tokenizer, settings, prompts, settings.response_prefix or "")
        directions, _ = measure_directions(model, editable.tokenizer, device, settings, texts, settings.batch_size)
        method = build_method(editable, settings, directions, texts, settings.batch_size, monitor)
        parameters = method.suggest(optuna.trial.FixedTrial(record["parameters"]))
        method.apply(parameters)
        new_record = {
            **record,
            "versions": package_versions(),
            "machine": machine(device, editable.loaded.dtype, editable.loaded.quantized),
            "settings": settings.model_dump(mode="json", exclude={"config", "storage"}),
            "prompts_sha256": prompt_hashes(prompts),
            "directions_sha256": tensor_hash(directions),
        }
        new_record.pop("files_sha256", None)
        summary = TrialSummary(
            record["method"],
            record["trial"],
            record["parameters"],
            method.describe(parameters),
            _recorded_scores(folder),
            new_record["settings"],
            new_record,
        )
        tokenizer = editable.tokenizer
        if record.get("export") == "adapter":
            save_adapter(source, editable.adapter, tokenizer, output_dir, summary)
        else:
            args = (settings.max_shard_size, summary, settings.trust_remote_code)
            save_merged(source, method.deltas(), tokenizer, output_dir, *args)
    finally:
        monitor.close()
        editable.kernels.restore()
    return json.loads((output_dir / FILE_NAME).read_text())


def _recorded_scores(folder: Path) -> dict:
    """The original export's scores (its apostate.json), for the rebuilt card; {} without one."""
    try:
        return json.loads((folder / "apostate.json").read_text()).get("scores", {})
    except (OSError, json.JSONDecodeError):
        return {}


def report(record: dict, rebuilt: dict) -> int:
    """Per weight file: the recorded and the rebuilt sha256, and whether they match."""
    from rich.table import Table

    table = Table(title="Weight files: recorded and rebuilt sha256")
    for column in ("File", "Recorded", "Rebuilt", "Match"):
        table.add_column(column)
    before, now = record["files_sha256"], rebuilt["files_sha256"]
    all_match = bool(before) and before.keys() == now.keys()
    for name in sorted(set(before) | set(now)):
        match = before.get(name) is not None and before.get(name) == now.get(name)
        all_match = all_match and match
        table.add_row(name, (before.get(name) or "-")[:16], (now.get(name) or "-")[:16], "yes" if match else "NO")
    console.print(table)
    if all_match:
        console.print(f"[green]Reproduced:[/] every weight file matches its recorded sha256 ({len(now)} files).")
        return 0
    found = differences(record, rebuilt)
    if found:
        console.print("[red]Not reproduced.[/] What differs from the original run: " + "; ".join(found))
    else:
        console.print(
            "[red]Not reproduced.[/] Versions, dtype, device, settings, prompts and refusal directions are "
            "all as recorded, so the difference is in this machine's arithmetic after the directions "
            "(a different processor or math library): the edit itself computes differently here."
        )
    return 1
