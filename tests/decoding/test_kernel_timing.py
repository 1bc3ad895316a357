"""Kernel choices made by timing change how a product is computed, never what it is."""

import torch
from tiny import tiny_model

from apostate.decoding import CpuKernels, kernel_timing
from apostate.decoding.cpu_kernels import route_linears
from apostate.decoding.kernel_timing import ROW_RANGES, KernelTimer


def test_layers_routed_to_onednn_give_the_same_outputs_and_see_in_place_edits():
    model, tokenizer = tiny_model("qwen2", layers=2, seed=4, initializer_range=0.3)
    inputs = tokenizer(["hi", "tell me a story about a dragon"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        before = model(**inputs).logits
        linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        assert route_linears(model, lambda weight: (False,) * len(ROW_RANGES)) == []
        assert route_linears(model, lambda weight: (True,) * len(ROW_RANGES)) == linear
        calls = []
        original = kernel_timing.onednn_linear
        kernel_timing.onednn_linear = lambda *args: calls.append(1) or original(*args)
        try:
            after = model(**inputs).logits
        finally:
            kernel_timing.onednn_linear = original
        assert len(calls) == len(linear)  # every layer went through oneDNN
        assert torch.allclose(before, after, rtol=1e-5, atol=1e-5)
        head = model.get_output_embeddings()
        head.weight.mul_(2)  # an edit written in place (as ARA writes its edits) takes effect at once
        assert torch.allclose(model(**inputs).logits, 2 * after, rtol=1e-5, atol=1e-4)


def test_routed_layers_fall_back_to_mkl_outside_their_row_ranges_and_for_gradients():
    layer = torch.nn.Linear(16, 8)
    choices = tuple(most is not None and most < 100 for most, _ in ROW_RANGES)  # oneDNN for few rows only
    assert route_linears(layer, lambda weight: choices) == [layer]
    calls = []
    original = kernel_timing.onednn_linear
    kernel_timing.onednn_linear = lambda *args: calls.append(1) or original(*args)
    try:
        with torch.no_grad():
            few, many = torch.randn(2, 3, 16), torch.randn(600, 16)
            assert torch.allclose(layer(few), torch.nn.functional.linear(few, layer.weight, layer.bias), atol=1e-6)
            assert len(calls) == 1
            layer(many)
            assert len(calls) == 1  # a prompt-sized batch takes MKL
        x = torch.randn(2, 16, requires_grad=True)
        layer(x).sum().backward()  # gradients flow: the autograd path is F.linear
        assert x.grad is not None and len(calls) == 1
    finally:
        kernel_timing.onednn_linear = original


def test_kernel_choices_are_kept_per_object_and_restore_gives_the_plain_forwards_back(monkeypatch):
    model, tokenizer = tiny_model("qwen2", layers=2, seed=4, initializer_range=0.3)
    inputs = tokenizer(["hi", "tell me a story about a dragon"], return_tensors="pt", padding=True)
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    kernels = CpuKernels()
    monkeypatch.setattr(kernels.timer, "onednn_pays", lambda weight: (True,) * len(ROW_RANGES))
    monkeypatch.setattr(kernels.timer, "column_major_pays", lambda weight: False)
    with torch.inference_mode():
        before = model(**inputs).logits
        assert "Linear layers on oneDNN" in kernels.apply(model)
        assert all("forward" in vars(module) for module in linear)  # swapped on each instance
        assert torch.allclose(model(**inputs).logits, before, rtol=1e-5, atol=1e-5)
        kernels.restore()
        assert not any("forward" in vars(module) for module in linear)  # the class's forward again
        assert torch.equal(model(**inputs).logits, before)
    timed = CpuKernels()
    timed.timer.onednn_pays(linear[0].weight)
    assert len(timed.timer.choices) == 1 and CpuKernels().timer.choices == {}  # no state shared between objects


def test_a_column_major_weight_is_timed_on_a_dense_sample(monkeypatch):
    """A slice of a column-major weight keeps the whole weight's column stride; oneDNN reorders
    such a weight at every product (37 s each for the demo's output projection): the timings
    must run on a dense copy in the same layout, or a start-up stalls for minutes."""
    timed = []

    def record(candidate, current, inputs):
        timed.extend(f.keywords["weight"] for f in (candidate, current) if hasattr(f, "keywords"))
        return 1.0, 1.0

    monkeypatch.setattr(kernel_timing, "_times", record)
    weight = torch.randn(8192, 64).t().contiguous().t()  # column-major, as the kernels store some weights
    kernel_timing.KernelTimer().onednn_pays(weight)
    assert timed and all(sample.shape == (kernel_timing.SAMPLE_OUTPUTS, 64) for sample in timed)
    assert all(sample.t().is_contiguous() for sample in timed), "a dense column-major sample"
    assert torch.equal(timed[0], weight[: kernel_timing.SAMPLE_OUTPUTS])


def test_a_burst_of_load_while_one_way_is_timed_does_not_flip_the_choice(monkeypatch):
    """Two ways of a product, one 20% faster; the machine is three times slower for the first
    eight calls (another process). Timed one way after the other, the burst fell on the faster
    way alone and it lost; timed in turn, each way gets calls outside the burst."""
    clock, calls = [0.0], [0]

    def way(seconds):
        def run(x):
            calls[0] += 1
            clock[0] += seconds * (3.0 if calls[0] <= 8 else 1.0)

        return run

    monkeypatch.setattr(kernel_timing.time, "perf_counter", lambda: clock[0])
    first, second = kernel_timing._times(way(0.8), way(1.0), [torch.zeros(1)])
    assert first < kernel_timing.MARGIN * second
    calls[0] = 0
    first, second = kernel_timing._times(way(1.0), way(0.8), [torch.zeros(1)])
    assert second < kernel_timing.MARGIN * first


def test_the_console_is_told_what_each_timed_choice_measured(monkeypatch):
    """A timed choice says what it measured: per weight shape, the seconds of both ways."""
    model, _ = tiny_model("qwen2", layers=1, seed=4)
    monkeypatch.setattr(kernel_timing, "_best_seconds", lambda ways, x: [0.002] + [0.001] * (len(ways) - 1))
    kernels = CpuKernels()
    told = kernels.apply(model)
    shape = "x".join(map(str, model.model.layers[0].mlp.down_proj.weight.shape))
    line = next(line for line in told.splitlines() if line.startswith(f"  * {shape}:"))
    assert "column-major 4 ms against row-major 2 ms" in line  # two row counts timed, 2 ms and 1 ms each
    assert "oneDNN/MKL at 16 rows 2 ms/1 ms, 128 rows 2 ms/1 ms, 512 rows 2 ms/1 ms" in line
    head = "x".join(map(str, model.get_output_embeddings().weight.shape))
    assert any(line.startswith(f"  * {head}:") and "bfloat16 screen" in line for line in told.splitlines())
    assert CpuKernels(KernelTimer(kernels.timer.choices)).apply(model) == ""  # choices read back: nothing timed
