"""The bfloat16-screened argmax equals the float32 argmax, near-ties included."""

import torch

from apostate.decoding import CpuKernels
from apostate.decoding.greedy_head import GreedyHead


def projection(vocabulary=5000, hidden=64, seed=0):
    torch.manual_seed(seed)
    linear = torch.nn.Linear(hidden, vocabulary, bias=False)
    linear.weight.data.normal_(0, 0.05)
    return linear


def test_screened_argmax_equals_float32_argmax():
    linear = projection()
    head = GreedyHead(linear)
    hidden = torch.randn(300, 64) * 40
    assert torch.equal(head.tokens(hidden), linear(hidden).argmax(-1))


def test_near_ties_are_decided_in_float32():
    """Two rows of the projection nearly equal: bfloat16 cannot tell them apart, float32 can."""
    linear = projection()
    with torch.no_grad():
        linear.weight[3] *= 50  # 3 and 7 the likeliest tokens for hidden states along row 3
        linear.weight[7] = linear.weight[3] * (1 + 1e-6)  # same bfloat16 row; 7 wins in float32
    hidden = linear.weight[3].detach().repeat(20, 1) + torch.randn(20, 64) * 1e-3
    expected = linear(hidden).argmax(-1)
    assert set(expected.tolist()) == {7}
    assert torch.equal(GreedyHead(linear).tokens(hidden), expected)
    assert torch.equal(GreedyHead(linear).tokens(-hidden), linear(-hidden).argmax(-1))


def test_keeps_the_leading_shape_and_applies_only_to_float32_cpu_projections(monkeypatch):
    linear = projection()
    hidden = torch.randn(2, 5, 64)
    assert GreedyHead(linear).tokens(hidden).shape == (2, 5)

    class Model(torch.nn.Module):
        def __init__(self, head):
            super().__init__()
            self.head = head

        def get_output_embeddings(self):
            return self.head

    kernels = CpuKernels()
    monkeypatch.setattr(kernels.timer, "bfloat16_screen_pays", lambda weight: True)
    model = Model(linear)
    assert isinstance(kernels.greedy_head(model), GreedyHead)
    assert kernels.greedy_head(model) is kernels.greedy_head(Model(linear))  # made once per projection
    assert CpuKernels().greedy_head(model) is not kernels.greedy_head(model)  # each CpuKernels owns its heads
    assert kernels.greedy_head(Model(projection().to(torch.bfloat16))) is None
    assert kernels.greedy_head(Model(torch.nn.Linear(64, 10, bias=True))) is None
    monkeypatch.setattr(kernels.timer, "bfloat16_screen_pays", lambda weight: False)
    assert kernels.greedy_head(Model(projection(seed=1))) is None  # this CPU screens slower than it computes
