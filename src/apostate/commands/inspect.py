"""`apostate inspect MODEL [settings] [--projection P] [--output DIR]`: the residual geometry of
a model, layer by layer, on the direction prompts a run would use (see geometry.py for every
quantity). Prints a table, writes geometry.json and geometry.png (and with --projection a grid
of 2-D projections, projection-P.png) to DIR, by default <run_dir>/inspect. Loads the model and
the prompts exactly as a run does (every apostate setting applies); runs no trial and writes
nothing else to the run folder."""

from __future__ import annotations

import argparse
import difflib
import json
import math
import re
from pathlib import Path

from pydantic import ValidationError
from rich import box
from rich.table import Table
from torch import Tensor

from apostate.config_sources import OneLineArgumentParser
from apostate.directions.geometry import LayerGeometry, best_layer, layer_geometry
from apostate.directions.plots import PROJECTIONS, check_projection, plot_geometry, plot_projections
from apostate.directions.residuals import prompt_residuals
from apostate.errors import ApostateError, first_line
from apostate.model.sources import ModelSource
from apostate.progress import console
from apostate.prompts import PromptSplits, Texts, load_prompt_splits
from apostate.session import open_model, open_source, run_dir_for
from apostate.settings import Settings, parse_command_line
from apostate.startup.measure import CACHE_FILE, measure_response_prefix, read_startup

DEFAULT_BATCH_SIZE = 8  # where --batch-size is 0 (automatic): inspect does not search one
SIDES = ("harmless", "harmful")
OWN_FLAGS = ["--projection", "--output"]
TITLE = "Residual geometry at the last prompt token (separability held out)"
COLUMNS = ("layer", "harmless\nnorm", "harmful\nnorm", "cos\nmeans", "gap", "cos\nprev", "cos\nnext", "AUC", "d")


def _options(argv: list[str]) -> tuple[argparse.Namespace, list[str], argparse.ArgumentParser]:
    """inspect's own flags, and the rest (MODEL and apostate settings) for the settings parser."""
    parser = OneLineArgumentParser(
        prog="apostate inspect",
        usage="apostate inspect MODEL [--projection {none,pca,pacmap,umap}] [--output DIR] [apostate options]",
        description="Residual geometry per layer: mean norms, cosines, refusal-direction stability and "
        "held-out separability of harmless and harmful prompts. Every apostate option (apostate --help) "
        "applies: dtypes, quantization, prompt sources and counts, chat template, batch size...",
        add_help=False,
        allow_abbrev=False,  # --output must never swallow --output-dir
    )
    parser.add_argument("-h", "--help", action="store_true", help="show this help and exit")
    parser.add_argument(
        "--projection",
        choices=PROJECTIONS,
        default="none",
        help="also plot every prompt's residual per layer in 2-D: pca (built in), pacmap or umap "
        "(pip install 'apostate[projections]')",
    )
    parser.add_argument(
        "--output", type=Path, metavar="DIR", help="folder for the results (default: <run_dir>/inspect)"
    )
    options, rest = parser.parse_known_args(argv)
    return options, rest, parser


def main(argv: list[str]) -> int:
    options, rest, parser = _options(argv)
    if options.help:
        parser.print_help()
        return 0
    settings = _settings(rest)
    check_projection(options.projection)  # before the model loads
    for side in SIDES:
        if getattr(settings, side).direction_count < 2:
            raise ApostateError(f"inspect needs at least 2 {side} direction prompts; raise --{side}.direction-count")
    source, settings = open_source(settings.model, settings.model_revision, settings)
    run_dir = run_dir_for(settings, source)
    output = options.output or run_dir / "inspect"
    if output.exists() and not output.is_dir():
        raise ApostateError(f"--output {output} is a file; name a folder")
    prompts = load_prompt_splits(settings)
    residuals = collect_residuals(settings, source, run_dir, prompts)
    console.print("Measuring the geometry...")
    layers = layer_geometry(residuals["harmless"], residuals["harmful"], settings.orthogonalize_direction)
    best = best_layer(layers)
    print_table(layers, best)
    counts = {side: residuals[side].shape[0] for side in SIDES}
    title = f"{source.name}: {counts['harmless']} harmless, {counts['harmful']} harmful prompts"
    try:
        output.mkdir(parents=True, exist_ok=True)
        written = [write_json(layers, best, source.name, counts, settings, output / "geometry.json")]
        written.append(plot_geometry(layers, best, title, output / "geometry.png"))
        if options.projection != "none":
            path = output / f"projection-{options.projection}.png"
            written.append(plot_projections(residuals, layers, options.projection, title, path))
    except OSError as error:
        raise ApostateError(f"cannot write to {output}: {first_line(error)}") from None
    console.print("Written: " + ", ".join(str(path) for path in written))
    return 0


def _settings(args: list[str]) -> Settings:
    """The settings a run with these arguments would use; a mistake is one line."""
    try:
        return parse_command_line(args)
    except ValidationError:
        raise  # the command line reports these as `invalid settings: ...`
    except (FileNotFoundError, ValueError) as error:
        raise ApostateError(first_line(error)) from None
    except ApostateError as error:  # a mistyped flag of inspect's own reaches the settings parser
        # The settings parser's own hint (a setting's flag) is dropped where inspect has a closer flag.
        message = str(error).partition(";")[0].partition(" (did you mean")[0]
        unknown = re.findall(r"(--[\w.-]+)", message) if "unrecognized arguments" in message else []
        close = [match for flag in unknown for match in difflib.get_close_matches(flag, OWN_FLAGS, n=1)]
        if not close:
            raise
        raise ApostateError(f"{message} (did you mean {', '.join(close)}?); apostate inspect --help") from None


def collect_residuals(
    settings: Settings, source: ModelSource, run_dir: Path, prompts: PromptSplits
) -> dict[str, Tensor]:
    """Every direction prompt's last-token residuals, per side, with the model loaded, the texts
    rendered and the response prefix chosen as a run does them (the prefix a run stored in the
    run folder where it matches these settings)."""
    opened = open_model(source, settings, run_dir, edit=False)
    tokenizer, kernels, loaded = opened.tokenizer, opened.kernels, opened.loaded
    try:
        batch_size = settings.batch_size or DEFAULT_BATCH_SIZE
        key = {
            "fingerprint": settings.measurement_fingerprint(source.name),
            "dtype": str(loaded.dtype),
            "batch_size": settings.batch_size,
        }
        stored = read_startup(run_dir / CACHE_FILE, key)
        if stored is not None:
            prefix = stored.response_prefix
            console.print(f"* Response prefix of the run: [bold]{prefix!r}[/]")
        else:
            args = (loaded.device, kernels, settings, prompts, batch_size)
            prefix, _ = measure_response_prefix(loaded.model, tokenizer, *args)
        texts = Texts(tokenizer, settings, prompts, prefix)
        return {
            side: prompt_residuals(
                loaded.model,
                tokenizer,
                texts.of(side, "direction"),
                batch_size,
                loaded.device,
                settings.winsorization_quantile,
                f"residuals ({side})",
            )
            for side in SIDES
        }
    finally:
        kernels.restore()


def _cell(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if math.isfinite(value) else str(value)


def print_table(layers: list[LayerGeometry], best: LayerGeometry | None) -> None:
    """One row per position; the best separating layer in bold."""
    table = Table(title=TITLE, box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
    for name in COLUMNS:
        table.add_column(name, justify="right")
    for layer in layers:
        table.add_row(
            "emb" if layer.layer is None else str(layer.layer),
            f"{layer.harmless_norm:.4g}",
            f"{layer.harmful_norm:.4g}",
            _cell(layer.means_cosine, 4),
            f"{layer.gap:.3g}",
            _cell(layer.cosine_previous),
            _cell(layer.cosine_next),
            _cell(layer.auc),
            _cell(layer.cohens_d, 2),
            style="bold green" if layer is best else None,
        )
    console.print(table)
    if best is None:
        console.print("No layer separates the two sets: their means are the same at every layer.")
        return
    where = "the embeddings" if best.layer is None else f"layer {best.layer} (direction_index {best.layer} in a run)"
    console.print(f"Best separation: [bold]{where}[/]: AUC {best.auc:.3f}, Cohen's d {_cell(best.cohens_d, 2)}")


def write_json(
    layers: list[LayerGeometry], best: LayerGeometry | None, model: str, counts: dict, settings: Settings, path: Path
) -> Path:
    """The table as data (non-finite numbers as null), with what it was measured on."""

    def plain(value):
        return None if isinstance(value, float) and not math.isfinite(value) else value

    rows = [{"layer": layer.layer, **{name: plain(value) for name, value in vars(layer).items()}} for layer in layers]
    data = {
        "model": model,
        "prompts": counts,
        "orthogonalize_direction": settings.orthogonalize_direction,
        "winsorization_quantile": settings.winsorization_quantile,
        "separability": "held out (leave-one-out): ROC AUC and Cohen's d of the projections on the direction",
        "best_layer": None if best is None else best.layer,
        "best_position": None if best is None else best.position,
        "layers": rows,
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path
