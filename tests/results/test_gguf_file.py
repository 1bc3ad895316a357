"""The GGUF writer (results/gguf_file.py) on a tiny GGUF base: each type's round trip (the edited
tensors are exactly the merged weights in that type, the logits close to the merged model's),
`same` copying unedited tensors byte for byte and writing types it cannot write in the next type
up, the metadata llama.cpp needs, and an edit it cannot place refused before any file is written.
The Ollama Modelfile's template renders conversations as the chat template does."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from tiny import CHAT_TEMPLATE, tiny_tokenizer
from tiny_gguf import tiny_gguf
from transformers import AutoModelForCausalLM, AutoTokenizer

from apostate.errors import ApostateError
from apostate.model.architecture import ResidualWriter, WriterEdit, discover
from apostate.results.gguf_file import write_gguf
from apostate.results.merge import parameter_name
from apostate.results.modelfile import turn_template, write_modelfile

T = gguf.GGMLQuantizationType
# How far the written model's logits may move from the merged float32 model's, as a share of the
# logits' spread: each type's rounding (f16 keeps 11 bits, bf16 8, q8_0 a 7-bit step per block of
# 32, in every matrix, embeddings included), carried through two tiny layers.
LOGIT_TOLERANCE = {"f16": 2e-3, "bf16": 2e-2, "q8_0": 0.1}


def load(file):
    model = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(file.parent, gguf_file=file.name)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    file = tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    model, tokenizer = load(file)
    return file, model, tokenizer


def random_edits(model, seed: int = 1, layers: set[int] | None = None):
    """An edit of every residual writer (of `layers`): (edits, merged weights by GGUF-free name)."""
    generator = torch.Generator().manual_seed(seed)
    edits, merged = [], {}
    for writer in discover(model).writers:
        if layers is not None and writer.layer not in layers:
            continue
        weight = model.get_submodule(writer.path).weight.detach()
        delta = torch.randn(weight.shape, generator=generator) * 0.05
        edits.append(WriterEdit(writer, tuple(weight.shape), lambda delta=delta: delta))
        merged[parameter_name(writer)] = weight + delta
    return edits, merged


def tensors(file) -> dict:
    return {tensor.name: tensor for tensor in gguf.GGUFReader(file).tensors}


def merged_model(model, merged: dict, kind=None):
    """The base model with the merged weights; with `kind`, every matrix rounded to that type."""
    copy = AutoModelForCausalLM.from_config(model.config).eval()
    copy.load_state_dict(model.state_dict())
    with torch.no_grad():
        for name, weight in merged.items():
            copy.get_parameter(name).copy_(weight)
        for parameter in copy.parameters() if kind is not None else ():
            if parameter.dim() == 2:
                rounded = gguf.quants.dequantize(gguf.quants.quantize(parameter.numpy(), kind), kind)
                parameter.copy_(torch.from_numpy(np.asarray(rounded, np.float32)))
    return copy


@pytest.mark.parametrize("choice, kind", [("f16", T.F16), ("bf16", T.BF16), ("q8_0", T.Q8_0)])
def test_each_type_writes_the_merged_weights_in_that_type(base, tmp_path, choice, kind):
    file, model, tokenizer = base
    edits, merged = random_edits(model)
    out = write_gguf(file, edits, tmp_path / f"out-{choice}.gguf", choice)
    written = tensors(out)
    for name, tensor in written.items():
        expected = kind if len(tensor.shape) == 2 else T.F32  # vectors keep their type
        assert tensor.tensor_type == expected, name
    edited = {"blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj.weight",
              "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj.weight"}  # fmt: skip
    for gguf_name, name in edited.items():
        expected = gguf.quants.quantize(merged[name].numpy(), kind)
        assert np.array_equal(np.asarray(written[gguf_name].data), expected), "exactly the merged weight, quantized"
    loaded, _ = load(out)
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Tell me about rivers."}], add_generation_prompt=True, return_tensors="pt"
    )["input_ids"]
    with torch.no_grad():
        reference = merged_model(model, merged)(ids).logits
        rounded = merged_model(model, merged, kind)(ids).logits
        logits = loaded(ids).logits
    assert not torch.equal(reference, model(ids).logits), "the edit changes the logits"
    torch.testing.assert_close(logits, rounded, rtol=0, atol=1e-5)  # the same weights: float rounding only
    assert (logits - reference).abs().max().item() <= LOGIT_TOLERANCE[choice] * reference.std().item()


def test_same_copies_unedited_tensors_and_writes_edited_ones_unrounded(base, tmp_path):
    file, model, _ = base
    edits, merged = random_edits(model, layers={1})
    out = write_gguf(file, edits, tmp_path / "same.gguf", "same")
    before, after = tensors(file), tensors(out)
    assert list(after) == list(before), "every tensor, in the base file's order"
    edited = {"blk.1.attn_output.weight", "blk.1.ffn_down.weight"}
    for name, tensor in after.items():
        assert tensor.tensor_type == before[name].tensor_type
        if name not in edited:
            assert np.array_equal(np.asarray(tensor.data), np.asarray(before[name].data)), name
    down = np.asarray(after["blk.1.ffn_down.weight"].data)
    assert np.array_equal(down, merged["model.layers.1.mlp.down_proj.weight"].numpy()), "float32 base: exact"


def test_same_writes_a_type_it_cannot_write_in_the_next_type_up(tmp_path, capsys):
    slow = {"blk.0.ffn_down.weight": T.Q6_K, "blk.1.ffn_down.weight": T.Q6_K}
    file = tiny_gguf(tmp_path / "k.gguf", intermediate_size=256, slow_types=slow)
    model, _ = load(file)
    edits, merged = random_edits(model, layers={0})
    out = write_gguf(file, edits, tmp_path / "same.gguf", "same")
    after, before = tensors(out), tensors(file)
    assert after["blk.0.ffn_down.weight"].tensor_type == T.Q8_0, "Q6_K (6.6 bits) -> Q8_0 (8.5 bits), not less"
    expected = gguf.quants.quantize(merged["model.layers.0.mlp.down_proj.weight"].numpy(), T.Q8_0)
    assert np.array_equal(np.asarray(after["blk.0.ffn_down.weight"].data), expected)
    assert after["blk.1.ffn_down.weight"].tensor_type == T.Q6_K, "unedited: kept in its own type"
    assert np.array_equal(
        np.asarray(after["blk.1.ffn_down.weight"].data), np.asarray(before["blk.1.ffn_down.weight"].data)
    )
    assert capsys.readouterr().err.count("written as Q8_0") == 1, "said once per type"


def test_the_metadata_llama_cpp_needs_travels_with_the_file(base, tmp_path):
    file, model, tokenizer = base
    edits, _ = random_edits(model)
    out = write_gguf(file, edits, tmp_path / "q8.gguf", "q8_0")
    reader, original = gguf.GGUFReader(out), gguf.GGUFReader(file)

    def field(r, key):
        return r.get_field(key).contents()

    assert field(reader, "general.architecture") == "qwen2"
    assert field(reader, "tokenizer.chat_template") == CHAT_TEMPLATE
    assert field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id", "qwen2.block_count", "qwen2.attention.head_count_kv"):  # fmt: skip
        assert field(reader, key) == field(original, key), key
    _, loaded_tokenizer = load(out)
    chat = [{"role": "user", "content": "How do bridges stand?"}]
    assert loaded_tokenizer.apply_chat_template(chat, add_generation_prompt=True) == tokenizer.apply_chat_template(
        chat, add_generation_prompt=True
    )
    assert loaded_tokenizer.eos_token == "<|im_end|>"


def test_an_edit_it_cannot_place_is_refused_before_any_file(base, tmp_path):
    file, model, _ = base
    writer = ResidualWriter(7, "mlp", "model.layers.7.mlp.down_proj", None)
    edit = WriterEdit(writer, (64, 128), lambda: torch.zeros(64, 128))
    out = tmp_path / "never.gguf"
    with pytest.raises(ApostateError, match="model.layers.7.mlp.down_proj.weight .* no matching tensor"):
        write_gguf(file, [edit], out, "q8_0")
    assert not out.exists()


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a river."},
]
QWEN_LIKE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a default helper.<|im_end|>\n{% endif %}"
    + CHAT_TEMPLATE
)


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, QWEN_LIKE])
def test_the_ollama_template_renders_conversations_as_the_chat_template_does(template):
    tokenizer = tiny_tokenizer(template)
    pieces = turn_template(tokenizer)
    for chat in (CONVERSATION, CONVERSATION[:2], CONVERSATION[1:]):
        expected = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        if chat[0]["role"] != "system" and pieces.default_system is not None:
            chat = [{"role": "system", "content": pieces.default_system}, *chat]  # Ollama's SYSTEM line
        assert pieces.render(chat) == expected
    assert pieces.default_system == (None if template == CHAT_TEMPLATE else "You are a default helper.")
    assert pieces.go_template().count("{{ .Content }}") == 1


def test_the_modelfile_names_the_file_the_template_the_stops_and_the_scored_system_prompt(tmp_path):
    tokenizer = tiny_tokenizer(QWEN_LIKE)
    text = write_modelfile(tmp_path, "tiny-Q8_0.gguf", tokenizer, "You answer plainly.").read_text()
    lines = text.splitlines()
    assert lines[0] == "FROM ./tiny-Q8_0.gguf"
    assert 'SYSTEM """You answer plainly."""' in text, "the system prompt the trial was scored with"
    assert 'PARAMETER stop "<|im_end|>"' in lines
    assert '{{ if eq .Role "user" }}' not in text and '{{ else if eq .Role "user" }}<|im_start|>user\n' in text
    default = write_modelfile(tmp_path, "x.gguf", tokenizer, None).read_text()
    assert 'SYSTEM """You are a default helper."""' in default


def test_a_chat_template_it_cannot_read_is_one_line():
    strict = "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}{% endfor %}"
    with pytest.raises(ApostateError, match="cannot write an Ollama template"):
        turn_template(tiny_tokenizer(strict))
