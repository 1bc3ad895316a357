"""The edit's mathematics: projection, LoRA form, normalization, kernel, directions, KL."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_model

from apostate.directions.refusal import direction_at, refusal_directions, winsorize
from apostate.methods.directional.method import DirectionalParameters, ablation_factors, apply
from apostate.methods.directional.weight_kernel import WeightKernel
from apostate.model.adapter import attach_adapter
from apostate.model.architecture import discover
from apostate.scoring.scorer import kl_divergence


def random_weight(out_features=48, in_features=80, experts=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(experts, out_features, in_features, generator=generator)


def unit(size, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(size, generator=generator), dim=0)


@pytest.mark.parametrize("strength", [0.0, 0.4, 1.0, 1.3])
def test_projection_scales_the_direction_component(strength):
    weight, v = random_weight(), unit(48)
    a, b = ablation_factors(weight, v, strength, "none", 1)
    edited = weight + b @ a
    assert torch.allclose(v @ edited[0], (1 - strength) * (v @ weight[0]), atol=1e-5)
    # Everything orthogonal to v is untouched.
    orthogonal = torch.eye(48) - torch.outer(v, v)
    assert torch.allclose(orthogonal @ edited[0], orthogonal @ weight[0], atol=1e-5)


@pytest.mark.parametrize("strength", [1.0, 1.3])
def test_full_normalization_restores_the_most_shrunk_rows_and_keeps_the_projection(strength):
    weight, v = random_weight(out_features=128, in_features=300), unit(128)
    weight[0, :, :3] += 3 * v[:, None]  # a few rows strongly aligned with the direction
    rank = 5
    a, b = ablation_factors(weight, v, strength, "full", rank=rank)
    assert a.shape == (1, rank, 300) and b.shape == (1, 128, rank)
    edited = weight + b @ a
    plain_a, plain_b = ablation_factors(weight, v, strength, "none", 1)
    projected = weight + plain_b @ plain_a
    norms, projected_change = weight.norm(dim=1)[0], (projected.norm(dim=1)[0] / weight.norm(dim=1)[0] - 1).abs()
    relative = (edited.norm(dim=1)[0] - norms).abs() / norms
    restored = projected_change.topk(rank - 1).indices
    # The rank - 1 rows the projection shrinks most keep their norm exactly (stated tolerance: 1e-5)...
    assert relative[restored].max() < 1e-5
    # ...and every other row changes no more than the least of those would have.
    others = torch.ones(300, dtype=torch.bool)
    others[restored] = False
    assert relative[others].max() <= projected_change[restored].min() + 1e-6
    # Rows not restored keep exactly the plain projection's component along v (none at all for w = 1).
    assert torch.allclose((v @ edited[0])[others], (1 - strength) * (v @ weight[0])[others], atol=1e-4)
    if strength == 1.0:
        assert (v @ edited[0]).abs().max() < 1e-4


def test_pre_normalization_is_rank_one_and_differs_from_plain():
    weight, v = random_weight(), unit(48)
    a, b = ablation_factors(weight, v, 1.0, "pre", 1)
    plain_a, plain_b = ablation_factors(weight, v, 1.0, "none", 1)
    assert a.shape == (1, 1, 80) and b.shape == (1, 48, 1)
    assert not torch.allclose(b @ a, plain_b @ plain_a)


def test_factors_are_per_expert():
    weight, v = random_weight(experts=3), unit(48)
    a, b = ablation_factors(weight, v, 1.0, "none", 1)
    edited = weight + b @ a
    for expert in range(3):
        assert torch.allclose(v @ edited[expert], torch.zeros(80), atol=1e-5)


def test_lora_path_equals_direct_weight_edit():
    model, tokenizer = tiny_model("llama", layers=3)
    reference, _ = tiny_model("llama", layers=3)
    architecture = discover(model)
    adapter = attach_adapter(model, architecture, rank=1)
    directions = F.normalize(torch.randn(4, 64, generator=torch.Generator().manual_seed(3)), dim=-1)
    kernel = WeightKernel(1.0, 1.0, 0.5, 1.5)
    parameters = DirectionalParameters(direction_index=None, kernels={"attn": kernel, "mlp": kernel})
    apply(adapter, directions, parameters, "none", rank=1)
    with torch.no_grad():
        for writer in architecture.writers:
            strength = kernel.weight_at(writer.layer)
            weight = reference.get_submodule(writer.path).weight
            v = directions[writer.layer + 1]
            weight -= strength * torch.outer(v, v @ weight)
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        assert torch.allclose(adapter.model(ids).logits, reference(ids).logits, atol=1e-4)


def test_kernel_shape():
    kernel = WeightKernel(max_weight=1.2, max_weight_position=10, min_weight=0.4, min_weight_distance=4)
    assert kernel.weight_at(10) == pytest.approx(1.2)
    assert kernel.weight_at(14) == pytest.approx(0.4)
    assert kernel.weight_at(6) == pytest.approx(0.4)
    assert kernel.weight_at(12) == pytest.approx(0.8)
    assert kernel.weight_at(15) == 0.0
    assert kernel.weight_at(5) == 0.0


def test_interpolated_direction_index():
    directions = F.normalize(torch.randn(6, 16), dim=-1)
    # Index i is the output of layer i, stored at position i + 1.
    assert torch.allclose(direction_at(directions, 2.0), directions[3], atol=1e-6)
    halfway = direction_at(directions, 2.5)
    expected = F.normalize(directions[3] + directions[4], dim=0)
    assert torch.allclose(halfway, expected, atol=1e-6)
    assert halfway.norm().item() == pytest.approx(1.0)


def test_refusal_direction_is_normalized_mean_difference():
    harmless = torch.randn(3, 8)
    harmful = harmless + torch.tensor([0, 2.0, 0, 0, 0, 0, 0, 0])
    directions = refusal_directions(harmless, harmful, orthogonalize=False)
    assert torch.allclose(directions, torch.tensor([0, 1.0, 0, 0, 0, 0, 0, 0]).expand(3, 8), atol=1e-6)


def test_orthogonalized_direction_has_no_harmless_component():
    harmless, harmful = torch.randn(4, 32), torch.randn(4, 32)
    directions = refusal_directions(harmless, harmful, orthogonalize=True)
    cosines = (directions * F.normalize(harmless, dim=-1)).sum(-1)
    assert cosines.abs().max() < 1e-5
    assert torch.allclose(directions.norm(dim=-1), torch.ones(4), atol=1e-5)


def test_winsorization_clamps_outliers_only():
    vector = torch.tensor([[1.0, -2.0, 3.0, 100.0, -0.5]])
    clamped = winsorize(vector, 0.75)
    limit = torch.quantile(vector.abs(), 0.75).item()
    assert clamped.abs().max().item() == pytest.approx(limit)
    assert clamped[0, 0].item() == 1.0
    assert torch.equal(winsorize(vector, 1.0), vector)


def test_kl_is_zero_for_identical_and_positive_otherwise():
    logprobs = torch.log_softmax(torch.randn(5, 30), dim=-1)
    assert kl_divergence(logprobs, logprobs) == 0.0
    other = torch.log_softmax(torch.randn(5, 30), dim=-1)
    value = kl_divergence(logprobs, other)
    expected = (logprobs.exp() * (logprobs - other)).sum(-1).mean().item()
    assert value > 0 and math.isclose(value, expected, rel_tol=1e-5)


@pytest.mark.parametrize("row_normalization", ["none", "full"])
def test_an_edit_has_the_same_bits_whatever_layout_the_cpu_kernels_chose(row_normalization):
    """The CPU kernels store some weights column-major when that multiplies faster (a timed, so
    machine- and moment-dependent choice); the edit computed from a weight must not depend on it,
    or `apostate reproduce` and a resumed run would get other bits."""
    model, _ = tiny_model(layers=2)
    adapter = attach_adapter(model, discover(model), rank=2)
    slot = adapter.slots[0]
    direction = unit(slot.base_weight().shape[1], seed=3)
    row_major = ablation_factors(slot.base_weight(), direction, 0.7, row_normalization, 2)
    weight = slot.module.get_base_layer().weight
    weight.data = weight.data.t().contiguous().t()  # what the kernels do: same values, strides (1, out)
    column_major = ablation_factors(slot.base_weight(), direction, 0.7, row_normalization, 2)
    for before, after in zip(row_major, column_major, strict=True):
        assert torch.equal(before, after)
