"""Rebuild an export without searching: `apostate reproduce FOLDER_OR_FILE`.

Every export holds `reproduce.json` (results/record.py). The rest of the start-up (refusal directions, ARA's captured
activations) is recomputed from the model and prompts, exactly as the run computed it.

Reproducing loads the model, recomputes the directions, applies the recorded parameters and saves
the export again; then it compares the weight files' hashes. Where they differ, it names what
differs between the two runs (versions, dtype, device, settings, prompts, directions) rather than
only saying that the files do.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import optuna
import tomli_w

from apostate.config_sources import OneLineArgumentParser
from apostate.errors import ApostateError
from apostate.monitor import PhaseMonitor
from apostate.progress import console
from apostate.prompts import Texts, load_prompt_splits
from apostate.results.export import TrialSummary, save_adapter, save_gguf, save_merged
from apostate.results.record import (
    FILE_NAME,
    NOT_RECIPE,
    differences,
    machine,
    package_versions,
    prompt_hashes,
    read_record,
    tensor_hash,
)
from apostate.session import build_method, open_model, open_source
from apostate.settings import parse_command_line
from apostate.startup.checks import fit_to_context, model_context
from apostate.startup.measure import measure_directions


def settings_for(record: dict, overrides: list[str], output_dir: Path):
    """The run's settings, as recorded, with the start-up quantities it measured and any `overrides`
    (setting flags) on top; headless, no judge, saving into `output_dir`."""
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
    source, settings = open_source(settings.model, settings.model_revision, settings, interactive=False)
    prompts = load_prompt_splits(settings)
    monitor = PhaseMonitor()
    with tempfile.TemporaryDirectory(prefix="apostate-reproduce-run-") as run_dir:
        opened = open_model(source, settings, Path(run_dir))
    try:
        model, device = opened.adapter.model, opened.loaded.device
        prompts = fit_to_context(opened.tokenizer, settings, prompts, model_context(model))  # as the run did
        texts = Texts(opened.tokenizer, settings, prompts, settings.response_prefix or "")
        directions, _ = measure_directions(model, opened.tokenizer, device, settings, texts, settings.batch_size)
        method = build_method(opened, settings, directions, texts, settings.batch_size, monitor)
        parameters = method.suggest(optuna.trial.FixedTrial(record["parameters"]))
        method.apply(parameters)
        new_record = {
            **record,
            "versions": package_versions(),
            "machine": machine(device, opened.loaded.dtype, opened.loaded.quantized),
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
        tokenizer = opened.tokenizer
        if record.get("export") == "adapter":
            save_adapter(source, opened.adapter, tokenizer, output_dir, summary)
        elif record.get("export") == "gguf":  # rebuilt unscored: the hash is what is checked
            save_gguf(
                source, method.deltas(), tokenizer, output_dir, settings.gguf.type, summary, settings.system_prompt
            )
        else:
            args = (settings.max_shard_size, summary, settings.trust_remote_code)
            save_merged(source, method.deltas(), tokenizer, output_dir, *args)
    finally:
        monitor.close()
        opened.kernels.restore()
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
