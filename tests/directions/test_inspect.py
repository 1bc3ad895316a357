"""`apostate inspect`: the geometry math on tensors whose answers are known, the per-prompt
residuals against the run's means, and the command on the tiny model (files, projections, errors)."""

import json
import math
import sys
import types

import pytest
import torch

from apostate.cli import main
from apostate.directions.geometry import (
    best_layer,
    cohens_d,
    held_out_projections,
    layer_geometry,
    pca_2d,
    roc_auc,
)
from apostate.directions.plots import check_projection, project
from apostate.directions.refusal import refusal_directions
from apostate.directions.residuals import prompt_residuals, residual_means
from apostate.errors import ApostateError

PNG = b"\x89PNG\r\n\x1a\n"
# Few prompts, a float32 model: the command on the tiny model in seconds.
FEW = (
    "--dtypes float32 --harmless.direction-count 6 --harmless.evaluation-count 2 --harmless.heldout-count 2 "
    "--harmful.direction-count 6 --harmful.evaluation-count 2 --harmful.heldout-count 2"
).split()


def around(means: list[list[float]], spread: float = 0.1) -> torch.Tensor:
    """(4, positions, hidden) points whose mean at each position is exactly `means[p]`: the mean
    plus and minus two fixed offsets."""
    centre = torch.tensor(means, dtype=torch.float64)
    offset = torch.zeros_like(centre)
    offset[:, -1] = spread
    other = torch.zeros_like(centre)
    other[:, -2] = spread
    return torch.stack([centre + offset, centre - offset, centre + other, centre - other]).float()


def test_identical_sets_have_no_direction_and_chance_separability():
    points = torch.randn(5, 3, 8)
    layers = layer_geometry(points, points.clone(), orthogonalize=True)
    assert len(layers) == 3
    for layer in layers:
        assert not layer.defined
        assert layer.auc == 0.5 and layer.cohens_d == 0.0
        assert layer.cosine_previous is None and layer.cosine_next is None
        assert layer.gap == 0.0 and layer.means_cosine == pytest.approx(1.0)
        assert layer.harmless_norm == pytest.approx(layer.harmful_norm)
    assert best_layer(layers) is None
    assert [layer.layer for layer in layers] == [None, 0, 1]


def test_separated_sets_have_auc_one_and_the_best_layer_is_found():
    torch.manual_seed(0)
    harmless = torch.randn(20, 3, 16)
    harmful = torch.randn(20, 3, 16)
    harmful[:, 1, 0] += 2.0  # position 1: partly apart
    harmful[:, 2, 0] += 12.0  # position 2: far apart
    layers = layer_geometry(harmless, harmful, orthogonalize=False)
    assert layers[2].auc == 1.0 and layers[2].cohens_d > 5
    assert 0.6 < layers[1].auc < 1.0 and 0 < layers[1].cohens_d < layers[2].cohens_d
    assert best_layer(layers).position == 2 and best_layer(layers).layer == 1


def test_cosines_norms_and_gap_of_known_vectors():
    # Means: harmless 3·e3 everywhere; harmful 3·e3 + 4·u_p with u along e0, (e0 + e1)/√2, e1.
    s = 4 / math.sqrt(2)
    harmless = around([[0, 0, 0, 3, 0, 0]] * 3)
    harmful = around([[4, 0, 0, 3, 0, 0], [s, s, 0, 3, 0, 0], [0, 4, 0, 3, 0, 0]])
    layers = layer_geometry(harmless, harmful, orthogonalize=True)
    for layer in layers:
        assert layer.harmless_norm == pytest.approx(3) and layer.harmful_norm == pytest.approx(5)
        assert layer.means_cosine == pytest.approx(3 / 5)
        assert layer.gap == pytest.approx(4)
        assert layer.defined and layer.auc == 1.0  # the sets lie 4 apart, spread 0.1
    diagonal = 1 / math.sqrt(2)
    assert [layer.cosine_previous for layer in layers] == [None, pytest.approx(diagonal), pytest.approx(diagonal)]
    assert [layer.cosine_next for layer in layers] == [pytest.approx(diagonal), pytest.approx(diagonal), None]


def test_the_runs_orthogonalize_setting_is_honoured():
    # The difference 4·e0 + 2·e3 has a part along the harmless mean 3·e3.
    harmless = around([[0, 0, 0, 3, 0, 0]])
    harmful = around([[4, 0, 0, 5, 0, 0]])
    orthogonal = layer_geometry(harmless, harmful, orthogonalize=True)[0]
    plain = layer_geometry(harmless, harmful, orthogonalize=False)[0]
    assert orthogonal.gap == pytest.approx(4)  # along e0 only
    assert plain.gap == pytest.approx(math.sqrt(20))  # the whole difference


def test_separability_is_held_out_so_sets_drawn_alike_do_not_separate():
    """In a wide residual, the direction made from all prompts separates even sets drawn alike
    (each prompt pulls its own side's mean); the held-out projections must not."""
    torch.manual_seed(1)
    harmless, harmful = torch.randn(40, 512).double(), torch.randn(40, 512).double()
    direction = refusal_directions(harmless.mean(0), harmful.mean(0), False)
    assert roc_auc(harmless @ direction, harmful @ direction) > 0.95  # in-sample: a fake separation
    held_out = held_out_projections(harmless, harmful, False)
    assert abs(roc_auc(*held_out) - 0.5) < 0.2
    layer = layer_geometry(harmless[:, None], harmful[:, None], orthogonalize=False)[0]
    assert abs(layer.auc - 0.5) < 0.2 and abs(layer.cohens_d) < 1


@pytest.mark.parametrize("orthogonalize", [False, True])
def test_held_out_projections_leave_each_prompt_out(orthogonalize):
    torch.manual_seed(2)
    harmless, harmful = torch.randn(5, 8).double() + 1, torch.randn(4, 8).double()
    harmless_scores, harmful_scores = held_out_projections(harmless, harmful, orthogonalize)
    for i in range(len(harmful)):
        rest = torch.cat([harmful[:i], harmful[i + 1 :]])
        direction = refusal_directions(harmless.mean(0), rest.mean(0), orthogonalize)
        assert harmful_scores[i].item() == pytest.approx((harmful[i] @ direction).item())
    for j in range(len(harmless)):
        rest = torch.cat([harmless[:j], harmless[j + 1 :]])
        direction = refusal_directions(rest.mean(0), harmful.mean(0), orthogonalize)
        assert harmless_scores[j].item() == pytest.approx((harmless[j] @ direction).item())


def test_auc_and_cohens_d_formulas():
    negatives, positives = torch.tensor([0.0, 1.0]), torch.tensor([1.0, 2.0])
    assert roc_auc(negatives, positives) == 0.875  # 3 pairs above, 1 tied of 4
    assert roc_auc(positives, negatives) == 0.125
    assert roc_auc(torch.zeros(3), torch.zeros(4)) == 0.5
    assert cohens_d(torch.tensor([0.0, 2.0]), torch.tensor([2.0, 4.0])) == pytest.approx(math.sqrt(2))
    assert cohens_d(torch.ones(3), torch.ones(3)) == 0.0
    assert cohens_d(torch.zeros(3), torch.ones(3)) == math.inf


def test_pca_of_known_points():
    points = torch.tensor([[2.0, 0, 5], [-2, 0, 5], [0, 1, 5], [0, -1, 5]])
    coordinates, shares = pca_2d(points)
    assert shares == [pytest.approx(0.8), pytest.approx(0.2)]
    assert coordinates.abs().tolist() == [[2, 0], [2, 0], [0, 1], [0, 1]]
    still, none = pca_2d(torch.ones(4, 3))  # all in one place
    assert still.abs().sum() == 0 and none == [0.0, 0.0]


def test_prompt_residuals_average_to_the_runs_means():
    from tiny import tiny_model

    model, tokenizer = tiny_model(layers=2)
    tokenizer.padding_side = "left"  # as loading sets it
    texts = ["hi", "a longer prompt here", "mid size", "x", "another one!"]
    each = prompt_residuals(model, tokenizer, texts, 2, "cpu", 0.9, "residuals")
    assert each.shape == (5, 3, 64) and each.dtype == torch.float32
    means = residual_means(model, tokenizer, texts, 2, "cpu", 0.9, "residuals").mean
    torch.testing.assert_close(each.mean(0), means, atol=1e-5, rtol=1e-5)
    alone = prompt_residuals(model, tokenizer, texts[1:2], 1, "cpu", 0.9, "residuals")
    torch.testing.assert_close(each[1], alone[0], atol=1e-5, rtol=1e-4)  # in the order of texts


def test_inspect_writes_the_table_and_plot(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    assert main(["inspect", str(model_dir), "--run-dir", str(run_dir), *FEW]) == 0
    output = run_dir / "inspect"
    data = json.loads((output / "geometry.json").read_text())
    assert data["model"] == str(model_dir) and data["prompts"] == {"harmless": 6, "harmful": 6}
    rows = data["layers"]
    assert [row["position"] for row in rows] == [0, 1, 2, 3, 4]  # embeddings + 4 decoder layers
    assert [row["layer"] for row in rows] == [None, 0, 1, 2, 3]
    for row in rows:
        assert {"harmless_norm", "harmful_norm", "means_cosine", "cosine_previous", "cosine_next", "auc"} <= set(row)
        assert 0.0 <= row["auc"] <= 1.0 and row["harmless_norm"] > 0
    assert rows[0]["cosine_previous"] is None and rows[-1]["cosine_next"] is None
    assert data["best_position"] in range(5)
    assert (output / "geometry.png").read_bytes().startswith(PNG)
    assert not list(output.glob("projection-*")) and sorted(p.name for p in run_dir.iterdir()) == ["inspect"]


def test_inspect_with_pca_writes_the_projection_grid(model_dir, tmp_path):
    output = tmp_path / "elsewhere"
    flags = ["--run-dir", str(tmp_path / "run"), "--projection", "pca", "--output", str(output), *FEW]
    assert main(["inspect", str(model_dir), *flags]) == 0
    assert (output / "projection-pca.png").read_bytes().startswith(PNG)
    assert (output / "geometry.png").is_file() and (output / "geometry.json").is_file()
    assert not (tmp_path / "run").exists()


def test_umap_without_its_package_is_one_line(model_dir, tmp_path, monkeypatch, bad_input):
    monkeypatch.setitem(sys.modules, "umap", None)  # not installed, whatever this machine has
    code = main(["inspect", str(model_dir), "--run-dir", str(tmp_path / "run"), "--projection", "umap", *FEW])
    line = bad_input.error("inspect", "--projection umap without the umap-learn package", code)
    assert line.endswith("projection 'umap' needs the umap-learn package: pip install 'apostate[projections]'")
    assert not (tmp_path / "run").exists()  # refused before the model loads


def test_an_unknown_projection_is_one_line(model_dir, tmp_path, bad_input):
    code = main(["inspect", str(model_dir), "--projection", "tsne", *FEW])
    line = bad_input.error("inspect", "--projection naming no projection", code)
    assert "invalid choice: 'tsne'" in line and "pca" in line


def test_a_mistyped_inspect_flag_is_named(model_dir, capsys):
    assert main(["inspect", str(model_dir), "--projektion", "pca"]) == 2
    assert "--projektion pca (did you mean --projection?)" in capsys.readouterr().err


def test_inspect_of_a_missing_model_is_one_line(tmp_path, bad_input):
    code = main(["inspect", str(tmp_path / "missing-model"), "--run-dir", str(tmp_path / "run")])
    assert "does not exist" in bad_input.error("inspect", "a model folder that does not exist", code)


def test_inspect_needs_two_direction_prompts_per_side(model_dir, tmp_path):
    with pytest.raises(ApostateError, match="at least 2 harmful direction prompts"):
        from apostate.commands.inspect import main as inspect

        inspect([str(model_dir), *FEW, "--harmful.direction-count", "1"])


def test_optional_projections_go_through_their_package(monkeypatch):
    class Reducer:
        def __init__(self, **options):
            self.options = options

        def fit_transform(self, data):
            return data[:, :2]

    monkeypatch.setitem(sys.modules, "umap", types.SimpleNamespace(UMAP=Reducer))
    check_projection("umap")
    points = torch.arange(12.0).reshape(4, 3)
    coordinates, labels = project(points, "umap")
    assert coordinates.tolist() == points[:, :2].tolist() and labels == ("UMAP 1", "UMAP 2")
    still, _ = project(torch.ones(4, 3), "umap")  # one place: no neighbours to lay out
    assert still.abs().sum() == 0
