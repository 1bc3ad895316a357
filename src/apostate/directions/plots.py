"""Pictures of the residual geometry (`apostate inspect`): the quantities over layers, and 2-D
projections of every prompt's residual per layer (PCA built in; PaCMAP and UMAP from the
optional `projections` extra)."""

from __future__ import annotations

import math
from importlib import import_module
from pathlib import Path

import torch
from torch import Tensor

from apostate.directions.geometry import LayerGeometry, pca_2d
from apostate.errors import ApostateError
from apostate.progress import track

PROJECTIONS = ("none", "pca", "pacmap", "umap")
# projection -> (module to import, package that provides it)
OPTIONAL = {"pacmap": ("pacmap", "pacmap"), "umap": ("umap", "umap-learn")}
COLOURS = {"harmless": "tab:blue", "harmful": "tab:red"}


def check_projection(projection: str) -> None:
    """One line naming the package to install, where `projection` needs one that is missing."""
    if projection not in OPTIONAL:
        return
    module, package = OPTIONAL[projection]
    try:
        import_module(module)
    except ImportError:
        raise ApostateError(
            f"projection '{projection}' needs the {package} package: pip install 'apostate[projections]'"
        ) from None


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_geometry(layers: list[LayerGeometry], best: LayerGeometry | None, title: str, path: Path) -> Path:
    """Three panels over the layers (-1: the embeddings): the means' norms, the cosines, and the
    held-out separability (AUC, Cohen's d on a second axis); the best layer dashed in each."""
    plt = _pyplot()
    from matplotlib.ticker import FormatStrFormatter, MaxNLocator, NullFormatter

    x = [layer.position - 1 for layer in layers]
    figure, (norms, cosines, separation) = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for side in ("harmless", "harmful"):
        norms.plot(x, [getattr(layer, f"{side}_norm") for layer in layers], color=COLOURS[side], label=side, marker=".")
    if all(getattr(layer, f"{side}_norm") > 0 for layer in layers for side in COLOURS):
        norms.set_yscale("log")
        norms.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        norms.yaxis.set_minor_formatter(NullFormatter())
    norms.set_ylabel("norm of the mean residual")
    cosines.plot(
        x,
        [layer.means_cosine for layer in layers],
        color="tab:purple",
        label="cos(harmless mean, harmful mean)",
        marker=".",
    )
    previous = [math.nan if layer.cosine_previous is None else layer.cosine_previous for layer in layers]
    cosines.plot(x, previous, color="tab:green", label="cos(direction, previous layer's direction)", marker=".")
    cosines.set_ylabel("cosine")
    separation.plot(x, [layer.auc for layer in layers], color="black", label="ROC AUC (held out)", marker=".")
    separation.set_ylim(min(0.4, *(layer.auc for layer in layers)) - 0.02, 1.02)
    separation.set_ylabel("ROC AUC")
    effect = separation.twinx()
    effect.plot(
        x, [_finite(layer.cohens_d) for layer in layers], color="tab:orange", label="Cohen's d (held out)", marker="."
    )
    effect.set_ylabel("Cohen's d", color="tab:orange")
    separation.xaxis.set_major_locator(MaxNLocator(integer=True))
    separation.set_xlabel("decoder layer whose output the residual is (-1: the embeddings)")
    for axes in (norms, cosines, separation):
        if best is not None:
            axes.axvline(best.position - 1, color="grey", linestyle="--", linewidth=1)
        axes.grid(alpha=0.3)
    norms.legend(loc="upper left", fontsize=8)
    cosines.legend(loc="lower left", fontsize=8)
    handles = separation.get_legend_handles_labels()[0] + effect.get_legend_handles_labels()[0]
    separation.legend(handles=handles, loc="lower right", fontsize=8)
    figure.suptitle(title + (f"\nbest separation: layer {best.position - 1} (dashed)" if best else ""))
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _finite(value: float) -> float:
    return value if math.isfinite(value) else math.nan


def plot_projections(
    residuals: dict[str, Tensor], layers: list[LayerGeometry], projection: str, title: str, path: Path
) -> Path:
    """One PNG, a grid with a panel per position: every prompt's residual there projected to 2-D
    (both sides projected together), coloured by side; each panel titled with its layer and AUC."""
    plt = _pyplot()
    positions = residuals["harmless"].shape[1]
    columns = math.ceil(math.sqrt(positions))
    rows = math.ceil(positions / columns)
    height = 2.5 * rows + 0.8
    figure, grid = plt.subplots(rows, columns, figsize=(max(2.6 * columns, 6.0), height), squeeze=False)
    count = residuals["harmless"].shape[0]
    with track(f"{projection} projections", total=positions) as advance:
        for position, axes in enumerate(grid.flat):
            if position >= positions:
                axes.axis("off")
                continue
            points = torch.cat([residuals["harmless"][:, position], residuals["harmful"][:, position]])
            coordinates, labels = project(points, projection)
            for side, part in (("harmless", coordinates[:count]), ("harmful", coordinates[count:])):
                axes.scatter(part[:, 0], part[:, 1], s=10, alpha=0.6, color=COLOURS[side], label=side, linewidths=0)
            layer = layers[position]
            name = "embeddings" if layer.layer is None else f"layer {layer.layer}"
            axes.set_title(f"{name}  AUC {layer.auc:.2f}", fontsize=8)
            axes.set_xlabel(labels[0], fontsize=7)
            axes.set_ylabel(labels[1], fontsize=7)
            axes.tick_params(labelsize=6)
            advance(1)
    handles, names = grid.flat[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="upper right", markerscale=2, fontsize=8)
    figure.suptitle(
        f"{title}\n{projection.upper() if projection == 'pca' else projection} of each prompt's residual, per layer"
    )
    figure.tight_layout(rect=(0, 0, 1, 1 - 0.8 / height))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def project(points: Tensor, projection: str) -> tuple[Tensor, tuple[str, str]]:
    """(n, 2) coordinates of `points` (n, hidden), and the two axes' labels."""
    if projection == "pca":
        coordinates, shares = pca_2d(points)
        return coordinates, (f"PC1 ({shares[0]:.0%} of variance)", f"PC2 ({shares[1]:.0%})")
    name = {"pacmap": "PaCMAP", "umap": "UMAP"}[projection]
    if points.std(dim=0).max().item() == 0.0:  # all in one place: nothing to lay out (and no neighbours)
        return torch.zeros(points.shape[0], 2), (f"{name} 1", f"{name} 2")
    data = points.double().numpy()
    if projection == "pacmap":
        reducer = import_module("pacmap").PaCMAP(n_components=2, n_neighbors=None, random_state=0)
        coordinates = reducer.fit_transform(data, init="pca")
    else:
        reducer = import_module("umap").UMAP(n_components=2, n_neighbors=min(15, len(data) - 1), random_state=0)
        coordinates = reducer.fit_transform(data)
    return torch.as_tensor(coordinates, dtype=torch.float32), (f"{name} 1", f"{name} 2")
