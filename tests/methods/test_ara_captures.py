"""ARA's captures: what each residual writer reads on the direction prompts, recorded on the
residual pass or by a pass of its own, in prompt order, in the model's dtype."""

import pytest
import torch
from test_ara import HARMFUL, HARMLESS, MOE
from tiny import tiny_model

from apostate.methods.ara.captures import build_captures, capture_slots, capture_writer_inputs
from apostate.model.adapter import attach_adapter
from apostate.model.architecture import discover


def test_captured_rows_keep_the_models_dtype_and_captures_are_built_in_float32():
    model, tokenizer = tiny_model("qwen2", layers=2, seed=1)
    model = model.to(torch.bfloat16)
    adapter = attach_adapter(model, discover(model), 4)
    linear, experts, _ = capture_slots(adapter)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in HARMLESS + HARMFUL]  # fmt: skip
    rows = capture_writer_inputs(model, tokenizer, adapter, linear, texts, 4, "cpu", "capturing")
    assert rows and all(tensor.dtype == torch.bfloat16 and tensor.shape[0] == len(texts) for tensor in rows.values())
    half = len(HARMLESS)
    captures = build_captures(
        adapter, {k: v[:half] for k, v in rows.items()}, {k: v[half:] for k, v in rows.items()}, 8
    )
    assert captures and all(c.harmless_outputs.dtype == torch.float32 for c in captures.values())


@pytest.mark.parametrize("arch", ["qwen2", "qwen3_moe"])
def test_fit_positions_capture_each_prompts_last_positions_in_prompt_order(arch):
    """positions = 3: three rows per prompt (its last three positions, first to last), whatever
    batch a prompt lands in; the last of them is what positions = 1 captures."""
    extra = MOE if arch == "qwen3_moe" else {}
    model, tokenizer = tiny_model(arch, layers=2, seed=4, **extra)
    adapter = attach_adapter(model, discover(model), 4)
    linear, experts, _ = capture_slots(adapter)
    slots = linear + experts
    # Prompts of one token length: no padding, so a prompt's activations do not depend on its batch.
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": f"prompt number {n}"}],
                                           add_generation_prompt=True, tokenize=False) for n in range(10, 22)]  # fmt: skip
    assert len({len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts}) == 1
    batched = capture_writer_inputs(model, tokenizer, adapter, slots, texts, 5, "cpu", "batched", positions=3)
    alone = capture_writer_inputs(model, tokenizer, adapter, slots, texts, 1, "cpu", "alone", positions=3)
    last = capture_writer_inputs(model, tokenizer, adapter, slots, texts, 5, "cpu", "last")
    assert batched.keys() == alone.keys()
    for key, rows in batched.items():
        assert rows.shape == alone[key].shape
        assert torch.allclose(rows, alone[key], atol=1e-4)  # batch size changes float sums; a wrong row is off by ~0.1
    for index in linear:
        rows = batched[(index, 0)].reshape(len(texts), 3, -1)
        assert torch.allclose(rows[:, -1], last[(index, 0)], atol=1e-4)
        assert not torch.allclose(rows[:, 0], last[(index, 0)], atol=1e-3)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3_moe"])
def test_the_residual_pass_records_exactly_what_a_capture_pass_of_its_own_does(arch):
    """The recorders carried by the refusal directions' residual pass give the same rows, bit for
    bit, as the separate capture pass they replace (same prompts, same batches)."""
    from apostate.directions.residuals import residual_means
    from apostate.methods.ara.captures import direction_pass_recorders

    extra = MOE if arch == "qwen3_moe" else {}
    model, tokenizer = tiny_model(arch, layers=2, seed=5, **extra)
    adapter = attach_adapter(model, discover(model), 4)
    linear, experts, _ = capture_slots(adapter)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in HARMLESS + HARMFUL]  # fmt: skip
    residual_means(model, tokenizer, texts[:1], 1, "cpu", 1.0, "warm-up")  # transformers adds hooks of its own
    hooks = sum(len(module._forward_hooks) for module in model.modules())
    recorder = direction_pass_recorders(adapter, positions=2)["harmful"]
    residual_means(model, tokenizer, texts, 5, "cpu", 1.0, "residuals", observer=recorder)
    own_pass = capture_writer_inputs(model, tokenizer, adapter, linear + experts, texts, 5, "cpu", "own", positions=2)
    recorded = recorder.captured()
    assert recorder.saw(len(texts)) and not recorder.saw(len(texts) + 1)
    assert recorded.keys() == own_pass.keys() and len(recorded) >= len(linear)
    for key, rows in own_pass.items():
        assert torch.equal(recorded[key], rows)
    assert sum(len(module._forward_hooks) for module in model.modules()) == hooks  # the recorder's left with the pass


def test_a_linear_writers_rows_are_written_into_one_buffer_for_the_whole_pass():
    """No per-batch copies: every batch of the pass writes into the same buffer, which
    `captured` hands out as it is (copies kept between freed activations fragment the heap)."""
    from apostate.directions.residuals import residual_means
    from apostate.methods.ara.captures import direction_pass_recorders

    model, tokenizer = tiny_model("qwen2", layers=2, seed=5)
    adapter = attach_adapter(model, discover(model), 4)
    linear, _, _ = capture_slots(adapter)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                           tokenize=False) for p in HARMLESS]  # fmt: skip
    recorder = direction_pass_recorders(adapter, positions=2)["harmless"]
    storages = []
    after = model.register_forward_hook(lambda *_: storages.append(recorder.linear_rows[linear[0]].buffer.data_ptr()))
    residual_means(model, tokenizer, texts, 5, "cpu", 1.0, "residuals", observer=recorder)
    after.remove()
    captured = recorder.captured()
    assert len(storages) == 3 and len(set(storages)) == 1  # three batches, one buffer
    assert captured[(linear[0], 0)].data_ptr() == storages[0]
    assert captured[(linear[0], 0)].shape[0] == 2 * len(texts)


def test_a_run_fits_ara_to_what_its_residual_pass_recorded_and_a_resumed_run_captures_again(tmp_path, monkeypatch):
    """A fresh run makes one pass over the direction prompts (no capture pass of its own); a run
    that reuses its start-up measurements has no residual pass to ride on, and captures."""
    from test_end_to_end import SMALL
    from tiny import tiny_model_folder

    import apostate.methods.ara.captures as captures
    from apostate.cli import main

    passes = []
    plain = captures.capture_writer_inputs
    monkeypatch.setattr(captures, "capture_writer_inputs", lambda *a, **k: passes.append(a[7]) or plain(*a, **k))
    folder = tiny_model_folder(tmp_path / "tiny")
    flags = [
        *SMALL,
        "--method",
        "ara-lora",
        "--ara.lbfgs-steps",
        "3",
        "--kl-cutoff",
        "100",
        "--headless",
        "--actions",
        "[]",
    ]
    assert main([str(folder), "--run-dir", str(tmp_path / "run"), *flags, "--n-trials", "2"]) == 0
    assert passes == []
    assert main([str(folder), "--run-dir", str(tmp_path / "run"), *flags, "--n-trials", "3"]) == 0
    assert passes == ["capturing (harmless)", "capturing (harmful)"]
