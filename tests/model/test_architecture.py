"""Residual-writer discovery across architectures, and the adapter slots over them."""

import pytest
import torch
from tiny import tiny_model

from apostate.errors import ApostateError
from apostate.model.adapter import attach_adapter
from apostate.model.architecture import discover

MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)


def writers_of(architecture, layer):
    return sorted(
        (w.component, w.path.split(f".{layer}.", 1)[1], w.parameter) for w in architecture.writers if w.layer == layer
    )


def test_dense_model_has_attention_and_mlp_writers():
    model, _ = tiny_model("llama", layers=2)
    architecture = discover(model)
    assert architecture.n_layers == 2
    assert writers_of(architecture, 0) == [("attn", "self_attn.o_proj", None), ("mlp", "mlp.down_proj", None)]
    assert architecture.unsupported == []


def test_moe_experts_are_found_as_stacked_parameter():
    model, _ = tiny_model("qwen3_moe", layers=2, **MOE)
    assert writers_of(discover(model), 1) == [("attn", "self_attn.o_proj", None), ("mlp", "mlp.experts", "down_proj")]


def test_hybrid_layers_differ():
    model, _ = tiny_model("lfm2", layers=2, layer_types=["conv", "full_attention"])
    architecture = discover(model)
    assert writers_of(architecture, 0) == [("attn", "conv.out_proj", None), ("mlp", "feed_forward.w2", None)]
    assert writers_of(architecture, 1) == [("attn", "self_attn.out_proj", None), ("mlp", "feed_forward.w2", None)]


def test_shared_expert_is_kept_next_to_fused_experts():
    model, _ = tiny_model("qwen3_next", layers=2, layer_types=["linear_attention", "full_attention"], **MOE)
    architecture = discover(model)
    assert ("mlp", "mlp.shared_expert.down_proj", None) in writers_of(architecture, 0)
    adapter = attach_adapter(model, architecture, rank=1)
    # PEFT drops shared-expert down_proj when remapping MoE targets; every writer must still have a slot.
    assert len(adapter.slots) == len(architecture.writers)


def test_unknown_architecture_is_a_clear_error():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64))
    with pytest.raises(ApostateError, match="not supported.*c_proj"):
        discover(model)


def test_unrecognized_hidden_size_writer_is_reported():
    model, _ = tiny_model("llama", layers=2)
    layer = model.model.layers[0]
    layer.mystery = torch.nn.Linear(64, 64)  # writes hidden-size outputs, unknown name
    architecture = discover(model)
    assert any("layers.0.mystery" in entry for entry in architecture.unsupported)


@pytest.mark.parametrize(
    "architecture_name,extra",
    [("llama", {}), ("qwen3_moe", MOE), ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2))],
)
def test_slots_write_exactly_the_requested_edit_and_reset_exactly(architecture_name, extra):
    model, _ = tiny_model(architecture_name, layers=2, **extra)
    reference, _ = tiny_model(architecture_name, layers=2, **extra)
    ids = torch.randint(3, 200, (2, 7))
    with torch.no_grad():
        base_logits = model(ids).logits
    architecture = discover(model)
    adapter = attach_adapter(model, architecture, rank=2)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for slot in adapter.slots:
            weight = slot.base_weight()
            experts, out_features, in_features = weight.shape
            a = torch.randn(experts, 1, in_features, generator=generator) * 0.1
            b = torch.randn(experts, out_features, 1, generator=generator) * 0.1
            slot.write(a, b)
            target = reference.get_submodule(slot.writer.path)
            parameter = getattr(target, slot.writer.parameter or "weight")
            parameter += slot.delta()
        assert torch.allclose(adapter.model(ids).logits, reference(ids).logits, atol=1e-4)
        adapter.reset()
        assert not adapter.edited_layers()
        assert torch.equal(adapter.model(ids).logits, base_logits)
