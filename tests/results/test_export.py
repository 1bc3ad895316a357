"""Merged export: streamed shard by shard, and from a 4-bit run back to full precision."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_model_folder, tiny_tokenizer
from transformers import AutoModelForCausalLM

from apostate.methods.directional.method import DirectionalParameters, apply
from apostate.methods.directional.weight_kernel import WeightKernel
from apostate.model.adapter import attach_adapter
from apostate.model.architecture import WriterEdit, discover
from apostate.model.sources import ModelSource
from apostate.results.export import TrialSummary, _merge_in_memory, _why_not_streamable, save_merged
from apostate.results.merge import INDEX_NAME, Checkpoint, parameter_name

SUMMARY = TrialSummary("directional", 0, {}, {}, {})


def state_dict_of(folder) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def random_edits(model, seed=0) -> list[WriterEdit]:
    generator = torch.Generator().manual_seed(seed)
    edits = []
    for writer in discover(model).writers:
        shape = tuple(model.get_submodule(writer.path).weight.shape)
        delta = torch.randn(shape, generator=generator) * 0.1
        edits.append(WriterEdit(writer, shape, lambda delta=delta: delta))
    return edits


def test_streamed_merge_equals_the_in_memory_merge_and_reshards(tmp_path):
    folder = tiny_model_folder(tmp_path / "tiny")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    edits = random_edits(base)
    source = ModelSource("tiny", str(folder))

    streamed = save_merged(source, edits, tiny_tokenizer(), tmp_path / "streamed", "60KB", SUMMARY)
    _merge_in_memory(source, edits, tmp_path / "in-memory", "60KB", False)

    index = json.loads((streamed / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 3  # split at the requested shard size
    assert all(file.stat().st_size < 60_000 + 8_000 for file in streamed.glob("*.safetensors"))
    merged, reference = state_dict_of(streamed), state_dict_of(tmp_path / "in-memory")
    original = state_dict_of(folder)
    assert merged.keys() == original.keys()
    for name, tensor in merged.items():
        assert torch.equal(tensor, reference.get(name, original[name])), name
    for edit in edits:  # the edit was really added
        name = parameter_name(edit.writer)
        assert torch.allclose(merged[name], original[name] + edit.compute(), atol=1e-6)

    reloaded = AutoModelForCausalLM.from_pretrained(streamed, dtype=torch.float32)
    ids = torch.tensor([[5, 9, 40, 77, 12]])
    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "in-memory", dtype=torch.float32)
    assert torch.equal(reloaded(ids).logits, merged_model(ids).logits)


def test_edits_that_do_not_map_onto_stored_tensors_are_merged_in_memory(tmp_path):
    folder = tiny_model_folder(tmp_path / "tiny")
    edit = random_edits(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32))[0]
    checkpoint = Checkpoint.find(folder)
    name = parameter_name(edit.writer)
    assert _why_not_streamable(checkpoint, folder, {name: edit}) is None
    renamed = {"model.renamed.o_proj.weight": edit}  # e.g. keys a conversion mapping renames on load
    assert "no tensor 'model.renamed.o_proj.weight'" in _why_not_streamable(checkpoint, folder, renamed)
    transposed = WriterEdit(edit.writer, edit.shape[::-1] + (1,), edit.compute)
    assert "is stored as" in _why_not_streamable(checkpoint, folder, {name: transposed})
    assert "no local safetensors" in _why_not_streamable(None, None, {name: edit})
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "fp8"}}))
    assert "quantized" in _why_not_streamable(checkpoint, folder, {name: edit})


def directional_edits(model, directions, row_normalization="none") -> list[WriterEdit]:
    architecture = discover(model)
    adapter = attach_adapter(model, architecture, 1)
    kernel = WeightKernel(1.0, 1.0, 0.5, 1.0)
    parameters = DirectionalParameters(None, {"attn": kernel, "mlp": kernel})
    apply(adapter, directions, parameters, row_normalization, 1)
    return [slot.edit() for slot in adapter.slots]


def test_export_of_a_4bit_run_matches_the_edit_applied_at_full_precision(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    folder = tiny_model_folder(tmp_path / "tiny", layers=3)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    quantized = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu").eval()
    with torch.inference_mode():  # as at load time: bitsandbytes may repack the weights now
        quantized(torch.tensor([[5, 9, 40]]))
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    directions = torch.nn.functional.normalize(torch.randn(4, 64, generator=torch.Generator().manual_seed(3)), dim=1)

    exported = save_merged(ModelSource("tiny", str(folder)), directional_edits(quantized, directions),
                           tiny_tokenizer(), tmp_path / "out", "5GB", SUMMARY)  # fmt: skip
    merged, original = state_dict_of(exported), state_dict_of(folder)
    direct = {parameter_name(e.writer): e.compute() for e in directional_edits(full, directions)}
    for name, tensor in merged.items():
        if name not in direct:
            assert torch.equal(tensor, original[name]), name  # untouched tensors stay bit-identical
            continue
        target = original[name] + direct[name]
        # Only the quantization error of vᵀW separates the two; NF4's error is about a tenth of a weight.
        assert (tensor - target).norm() < 0.2 * direct[name].norm(), name
        layer = int(name.split(".")[2])
        v = directions[layer + 1]
        weight = 1.0 if layer == 1 else 0.5  # the kernel: full weight at layer 1, half at its edge
        removed = (v @ tensor).norm() / (v @ original[name]).norm()
        assert removed == pytest.approx(1 - weight, abs=0.15), name


def test_4bit_weights_read_back_the_same_before_and_after_a_forward_pass(tmp_path):
    """bitsandbytes repacks 4-bit weights on the first CPU forward where AVX512-BF16 exists;
    reading them must not depend on that (elsewhere there is no repacking and this holds trivially)."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from apostate.model.bnb_weights import dequantize

    folder = tiny_model_folder(tmp_path / "tiny", layers=2)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config, device_map="cpu").eval()
    layer = model.model.layers[1].mlp.down_proj
    before = dequantize(layer.weight).clone()
    with torch.inference_mode():
        model(torch.tensor([[5, 9, 40]]))
    after = dequantize(layer.weight)
    assert (after - before).norm() < 0.01 * before.norm()  # bf16 rounding of the block scales at most
    x = torch.randn(4, before.shape[1])
    with torch.inference_mode():
        assert (layer(x) - x @ after.T).norm() < 0.01 * (x @ after.T).norm()
