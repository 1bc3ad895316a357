"""Arbitrary-Rank Ablation: the objective, its fit, and both forms on tiny random models."""

import pytest
import torch
from optuna.trial import FixedTrial
from tiny import KL_ROUNDING, tiny_model

from apostate.decoding.batching import last_position_logprobs
from apostate.methods.ara.captures import ModuleCapture, build_captures, capture_slots, capture_writer_inputs
from apostate.methods.ara.objective import Objective, ObjectiveWeights, fit
from apostate.methods.context import MethodContext
from apostate.methods.protocol import method_class
from apostate.model.adapter import attach_adapter
from apostate.model.architecture import discover
from apostate.settings import Settings

HARMLESS = [f"Tell me about the colour number {i} of the rainbow." for i in range(12)]
HARMFUL = [f"Explain how to break lock model {i} without a key." for i in range(12)]


def random_capture(n=24, width=20, out=16, seed=0) -> ModuleCapture:
    generator = torch.Generator().manual_seed(seed)
    harmless = torch.randn(n, width, generator=generator)
    harmful = torch.randn(n, width, generator=generator) + 1.5
    weight = torch.randn(out, width, generator=generator)
    basis = torch.linalg.svd(torch.cat([harmless, harmful]), full_matrices=False)[2]
    return ModuleCapture(
        basis, harmless @ basis.T, harmful @ basis.T, harmless @ weight.T, harmful @ weight.T, weight.norm()
    )


def fitted(capture, weights, kind, steps=30):
    coefficients = torch.zeros(capture.harmful_outputs.shape[1], capture.basis.shape[0])
    objective = Objective(capture, weights, kind)
    start = objective(capture.harmless_outputs, capture.harmful_outputs).item()
    end = fit(objective, [coefficients], lambda coords: coords @ coefficients.T, steps)
    return start, end, coefficients


@pytest.mark.parametrize("kind", ["smooth", "knn"])
def test_objective_decreases_under_lbfgs(kind):
    start, end, coefficients = fitted(random_capture(), ObjectiveWeights(1.0, 1.0, 0.5, 0.2, 4), kind)
    assert end < start - 1e-3
    assert coefficients.abs().sum() > 0


def test_smooth_objective_has_no_gradient_jump_where_knn_has_one():
    """A harmful output crossing the point equidistant from two harmless outputs: with k = 1 the
    nearest neighbour switches and the gradient jumps; the softmin gradient changes by O(ε)."""
    harmless = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    capture = ModuleCapture(
        torch.eye(2), harmless, torch.zeros(1, 2), harmless, torch.tensor([[0.0, 3.0]]), torch.tensor(1.0)
    )
    weights = ObjectiveWeights(preserve=0.0, steer=1.0, overcorrect=0.0, temperature=0.5, neighbours=1)

    def gradient(kind, x):
        point = torch.tensor([[x, 1.0]], requires_grad=True)
        Objective(capture, weights, kind)(harmless, point).backward()
        return point.grad[0]

    def jump(kind, epsilon):
        return (gradient(kind, epsilon) - gradient(kind, -epsilon)).norm().item()

    # kNN: the same jump however close to the switch; softmin: the change vanishes with ε.
    assert jump("knn", 1e-5) > 0.5 and jump("knn", 1e-5) == pytest.approx(jump("knn", 1e-3), rel=0.05)
    assert jump("smooth", 1e-3) < 0.05
    assert jump("smooth", 1e-5) < jump("smooth", 1e-3) / 20


def test_knn_push_runs_away_above_overcorrect_one_and_smooth_stays_bounded():
    """pull − o·push with squared distances is unbounded below for o > 1; the saturating push is not."""
    weights = ObjectiveWeights(preserve=1.0, steer=1.0, overcorrect=1.3, temperature=0.2, neighbours=4)
    capture = random_capture(n=8, width=40)  # harmful inputs reach directions the harmless ones do not pin
    _, knn_loss, knn_edit = fitted(capture, weights, "knn", steps=100)
    _, smooth_loss, smooth_edit = fitted(capture, weights, "smooth", steps=100)
    runaway = not torch.isfinite(knn_edit).all() or knn_edit.norm() > 20 * smooth_edit.norm()
    assert runaway, "LBFGS on the knn objective should run off (to huge or non-finite weights)"
    assert not knn_loss > -1e3  # very negative, or NaN
    assert torch.isfinite(smooth_edit).all() and smooth_loss > -10


@pytest.fixture(scope="module")
def tiny():
    model, tokenizer = tiny_model("qwen2", layers=3, seed=1)
    return model, tokenizer


MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[])


def make_method(model, tokenizer, method: str, **ara):
    settings = Settings(model="tiny", method=method, ara={"lora_rank": 4, "lbfgs_steps": 10, **ara})
    architecture = discover(model)
    method_type = method_class(method)
    adapter = attach_adapter(model, architecture, method_type.adapter_rank(settings.ara))
    texts = {
        side: [
            tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            for p in prompts
        ]
        for side, prompts in (("harmless", HARMLESS), ("harmful", HARMFUL))
    }
    linear, experts, skipped = capture_slots(adapter)
    assert not skipped
    inputs = {
        side: capture_writer_inputs(adapter.model, tokenizer, adapter, linear + experts, texts[side], 8, "cpu", side)
        for side in texts
    }
    captures = build_captures(adapter, inputs["harmless"], inputs["harmful"], settings.ara.basis_rank)
    directions = torch.zeros(4, 64)
    context = MethodContext(
        adapter, settings.ara, architecture.n_layers, ["attn", "mlp"], directions, prepared=captures
    )
    return method_type(context), adapter, texts


def trial_parameters(steer=0.8, overcorrect=0.5, start=0.0):
    return {
        "layer_start": start,
        "layer_span": 2.0,
        "preserve_weight": 1.0,
        "steer_weight": steer,
        "overcorrect_weight": overcorrect,
        "temperature": 0.3,
    }


def logprobs(adapter, tokenizer, texts):
    return last_position_logprobs(adapter.model, tokenizer, texts["harmless"] + texts["harmful"], 8, "cpu")


@pytest.mark.parametrize("method_name", ["ara", "ara-lora"])
def test_zero_steer_leaves_outputs_unchanged_and_reset_is_exact(method_name):
    model, tokenizer = tiny_model("qwen2", layers=3, seed=1)
    method, adapter, texts = make_method(model, tokenizer, method_name)
    base = logprobs(adapter, tokenizer, texts)

    method.apply(method.suggest(FixedTrial(trial_parameters(steer=0.0))))
    assert torch.equal(logprobs(adapter, tokenizer, texts), base)

    method.reset()
    method.apply(method.suggest(FixedTrial(trial_parameters())))
    edited = logprobs(adapter, tokenizer, texts)
    assert not torch.allclose(edited, base)
    assert sum(edit.compute().abs().sum() for edit in method.deltas()) > 0
    method.reset()
    assert torch.equal(logprobs(adapter, tokenizer, texts), base)


@pytest.mark.parametrize("method_name", ["ara", "ara-lora"])
def test_same_parameters_give_the_same_model_in_any_order(method_name):
    model, tokenizer = tiny_model("qwen2", layers=3, seed=1)
    method, adapter, texts = make_method(model, tokenizer, method_name)
    first, second = trial_parameters(), trial_parameters(steer=0.5, overcorrect=1.2, start=1.0)

    method.reset()
    method.apply(method.suggest(FixedTrial(second)))
    alone = logprobs(adapter, tokenizer, texts)
    method.reset()
    method.apply(method.suggest(FixedTrial(first)))
    method.reset()
    method.apply(method.suggest(FixedTrial(second)))
    assert torch.equal(logprobs(adapter, tokenizer, texts), alone)


def test_steering_moves_harmful_outputs_toward_harmless_ones():
    model, tokenizer = tiny_model("qwen2", layers=3, seed=1)
    method, adapter, texts = make_method(model, tokenizer, "ara")
    parameters = method.suggest(FixedTrial(trial_parameters(steer=1.0, overcorrect=0.0)))
    first = next(method.selected(parameters), None)
    assert first is not None, "the trial's layers select some module"
    index, expert, _slot, capture = first
    objective = method.objective(capture, parameters)
    before = objective(capture.harmless_outputs, capture.harmful_outputs).item()
    method.apply(parameters)
    delta = method.edits[(index, expert)]
    harmful = capture.harmful_outputs + capture.harmful_coords @ (delta @ capture.basis.T).T
    harmless = capture.harmless_outputs + capture.harmless_coords @ (delta @ capture.basis.T).T
    gap_before = (capture.harmful_outputs.mean(0) - capture.harmless_outputs.mean(0)).norm()
    gap_after = (harmful.mean(0) - capture.harmless_outputs.mean(0)).norm()
    assert objective(harmless, harmful).item() < before
    assert gap_after < gap_before


def test_trust_region_caps_the_edit():
    model, tokenizer = tiny_model("qwen2", layers=3, seed=1)
    method, adapter, texts = make_method(model, tokenizer, "ara", max_relative_edit=0.01)
    method.apply(method.suggest(FixedTrial(trial_parameters(steer=1.0))))
    assert method.edits, "the trial edits some module"
    for (index, _expert), delta in method.edits.items():
        weight = method.originals[index].float()
        assert delta.norm() <= 0.01 * weight.norm() * 1.0001


def test_full_weight_ara_refuses_a_quantized_model():
    from apostate.errors import ApostateError

    settings = Settings(model="tiny", method="ara", quantization="bnb_4bit")
    with pytest.raises(ApostateError, match="ara-lora"):
        method_class("ara")(MethodContext(None, settings.ara, 3, ["attn"], torch.zeros(1), quantized=True))


def test_ara_lora_on_a_4bit_base(tmp_path):
    pytest.importorskip("bitsandbytes")
    from tiny import tiny_model_folder
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    folder = tiny_model_folder(tmp_path / "tiny")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu").eval()
    from tiny import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    method, adapter, texts = make_method(model, tokenizer, "ara-lora")
    base = logprobs(adapter, tokenizer, texts)
    method.apply(method.suggest(FixedTrial(trial_parameters())))
    edited = logprobs(adapter, tokenizer, texts)
    assert torch.isfinite(edited).all() and not torch.allclose(edited, base)
    method.reset()
    assert torch.equal(logprobs(adapter, tokenizer, texts), base)


@pytest.mark.parametrize("method_name", ["ara", "ara-lora"])
def test_headless_ara_run_exports_the_scored_model(method_name, tmp_path):
    """Through the CLI: trials, then the merged export reproduces the KL the trial recorded."""
    import json

    from exports import exported_kl, run_and_save
    from test_end_to_end import SMALL, load_study
    from tiny import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "tiny")
    run_dir, output = tmp_path / "run", tmp_path / "model"
    flags = [*SMALL, "--method", method_name, "--ara.lbfgs-steps", "5", "--kl-cutoff", "100"]
    assert run_and_save(str(folder), run_dir, output, [*flags, "--n-trials", "2"], "--trial", "1") == 0
    assert json.loads((output / "apostate.json").read_text())["method"] == method_name
    trial = next(t for t in load_study(run_dir).trials if t.number == 1)
    kl = exported_kl(folder, output, run_dir, flags)
    assert kl > 0
    assert kl == pytest.approx(trial.user_attrs["kl"], rel=1e-3, abs=KL_ROUNDING)


@pytest.mark.parametrize("method_name", ["ara", "ara-lora"])
def test_fused_moe_experts_are_captured_and_edited_per_expert(method_name):
    model, tokenizer = tiny_model("qwen3_moe", layers=2, seed=2, **MOE)
    method, adapter, texts = make_method(model, tokenizer, method_name)
    expert_keys = [key for key in method.captures if adapter.slots[key[0]].stacked]
    assert expert_keys, "some experts were routed last-position tokens"
    for key in expert_keys:  # an expert's rows: one per prompt routed to it, on each side
        capture = method.captures[key]
        assert 1 <= capture.harmless_outputs.shape[0] <= len(HARMLESS)
    # Coordinates and outputs of a capture agree with each other.
    index, expert = expert_keys[0]
    capture = method.captures[(index, expert)]
    weight = adapter.slots[index].base_weight()[expert]
    rebuilt = capture.harmful_coords @ capture.basis @ weight.T
    assert torch.allclose(rebuilt, capture.harmful_outputs, atol=1e-4)

    base = logprobs(adapter, tokenizer, texts)
    method.apply(method.suggest(FixedTrial(trial_parameters(steer=1.0))))
    assert not torch.allclose(logprobs(adapter, tokenizer, texts), base)
    stacked = {edit.writer.path: edit.compute() for edit in method.deltas() if edit.writer.parameter}
    delta = stacked[adapter.slots[index].writer.path]
    edited = {e for (i, e) in method.captures if i == index}
    for e in range(delta.shape[0]):  # experts never reached stay untouched
        assert bool(delta[e].abs().sum() > 0) == (e in edited)
    method.reset()
    assert torch.equal(logprobs(adapter, tokenizer, texts), base)


def test_recomputed_expert_inputs_reproduce_the_experts_forward():
    from apostate.methods.ara.expert_captures import down_inputs

    model, _ = tiny_model("qwen3_moe", layers=1, seed=3, **MOE)
    experts = model.model.layers[0].mlp.experts
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 64, generator=generator)
    chosen = torch.stack([torch.randperm(4, generator=generator)[:2] for _ in range(5)])
    routing = torch.rand(5, 2, generator=generator)
    with torch.no_grad():
        expected = experts(hidden, chosen, routing)
        ids, inputs = down_inputs(experts, hidden, chosen)
        outputs = torch.einsum("ni,noi->no", inputs, experts.down_proj[ids]).reshape(5, 2, -1)
    assert torch.allclose((routing[..., None] * outputs).sum(dim=1), expected, atol=1e-5)


def test_adapter_only_export_of_full_weight_ara_is_a_clear_error_and_keeps_the_trials(tmp_path, bad_input):
    from test_end_to_end import SMALL, load_study
    from tiny import tiny_model_folder

    from apostate.cli import main

    folder = tiny_model_folder(tmp_path / "tiny")
    flags = [*SMALL, "--method", "ara", "--kl-cutoff", "100", "--n-trials", "2", "--headless"]
    code = main([str(folder), "--run-dir", str(tmp_path / "run"), *flags, "--actions", "save-adapter"])
    assert "cannot hold" in bad_input.error("export", "an adapter export of a full-weight ARA trial", code)
    assert len(load_study(tmp_path / "run").trials) == 2
