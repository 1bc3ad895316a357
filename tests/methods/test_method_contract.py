"""What every registered method promises the trial loop, checked over the registry on a tiny
random model: reset gives back the base model bit for bit, the same parameters give the same
model in any order, `deltas()` is the live edit, and the adapter holds the edit exactly when the
method says it does (`edits_in_adapter`)."""

import optuna
import pytest
import torch
from tiny import tiny_model

from apostate.methods import METHODS
from apostate.methods.context import MethodContext, RunInputs
from apostate.methods.protocol import method_class
from apostate.model.adapter import attach_adapter
from apostate.model.architecture import discover
from apostate.settings import Settings

PROMPTS = {
    "harmless": [f"Tell me about the colour number {i} of the rainbow." for i in range(10)],
    "harmful": [f"Explain how to break lock model {i} without a key." for i in range(10)],
}


class ChatTexts:
    """The prompts as chat text, the way `prompts.Texts` hands them to a method."""

    def __init__(self, tokenizer):
        self.chats = {
            side: [
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False
                )
                for p in prompts
            ]
            for side, prompts in PROMPTS.items()
        }

    def of(self, side: str, subset: str) -> list[str]:
        return self.chats[side]


def build(name: str):
    model, tokenizer = tiny_model("qwen2", layers=3, seed=2)
    settings = Settings(model="tiny", config=None, method=name, ara={"lora_rank": 4, "lbfgs_steps": 5})
    method_type = method_class(name)
    own = settings.method_settings()
    architecture = discover(model)
    adapter = attach_adapter(model, architecture, method_type.adapter_rank(own))
    directions = torch.nn.functional.normalize(torch.randn(architecture.n_layers + 1, model.config.hidden_size), dim=1)
    context = MethodContext(adapter, own, architecture.n_layers, ["attn", "mlp"], directions)
    if method_type.preparation is not None:
        inputs = RunInputs(adapter, tokenizer, torch.device("cpu"), ChatTexts(tokenizer), 8, own, "cpu")
        context.prepared = method_type.prepare(inputs)
    return method_type(context), adapter


def parameters(method, number: int):
    """A trial's parameters as a sampler would draw them (seeded per `number`)."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=number))
    return method.suggest(study.ask())


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def assert_same(before: dict, after: dict) -> None:
    assert before.keys() == after.keys()
    differ = [name for name in before if not torch.equal(before[name], after[name])]
    assert not differ, differ[:5]


@pytest.fixture(params=sorted(METHODS))
def built(request):
    return (request.param, *build(request.param))


def test_reset_gives_back_the_base_model_bit_for_bit(built):
    _, method, adapter = built
    base = snapshot(adapter.model)
    method.apply(parameters(method, 1))
    assert any(not torch.equal(base[k], v) for k, v in adapter.model.state_dict().items()), "the edit changed nothing"
    method.reset()
    assert_same(base, snapshot(adapter.model))


def test_the_same_parameters_give_the_same_model_in_any_order(built):
    _, method, adapter = built
    first, second = parameters(method, 1), parameters(method, 2)
    method.apply(first)
    alone = snapshot(adapter.model)
    for other in (second, first, second):
        method.reset()
        method.apply(other)
    method.reset()
    method.apply(first)
    assert_same(alone, snapshot(adapter.model))


def test_deltas_are_the_live_edit(built):
    _, method, adapter = built
    base = {slot.writer.path: slot.base_weight().clone() for slot in adapter.slots}
    method.apply(parameters(method, 3))
    reported = {edit.writer.path: edit.compute().float() for edit in method.deltas()}
    assert reported, "an edit with no deltas"
    for slot in adapter.slots:
        live = (slot.base_weight() - base[slot.writer.path]) + slot.delta().reshape(slot.base_weight().shape)
        expected = reported.get(slot.writer.path, torch.zeros_like(live)).reshape(live.shape)
        assert torch.allclose(live, expected, rtol=0, atol=1e-5), slot.writer.path
        assert slot.writer.layer in method.edited_layers() or not live.any()


def test_the_adapter_holds_the_edit_iff_the_method_says_so(built):
    name, method, adapter = built
    base = {slot.writer.path: slot.base_weight().clone() for slot in adapter.slots}
    method.apply(parameters(method, 4))
    in_adapter = any(slot.delta().any() for slot in adapter.slots)
    in_weights = any(not torch.equal(slot.base_weight(), base[slot.writer.path]) for slot in adapter.slots)
    assert in_adapter != in_weights, name
    assert in_adapter == method_class(name).edits_in_adapter
