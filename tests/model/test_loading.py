"""Loading: column-major weights and dropped checkpoint pages leave the model's outputs as they were."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny import tiny_model_folder
from transformers import AutoModelForCausalLM

from apostate.model.checkpoint_pages import checkpoint_mappings, release_checkpoint_pages
from apostate.model.loading import load_model
from apostate.model.sources import resolve_source
from apostate.settings import parse_command_line


def resident_checkpoint_bytes() -> int:
    """Resident bytes of this process's .safetensors mappings (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5 and ":" in fields[3]:  # a mapping's header line
                inside = len(fields) == 6 and fields[5].endswith(".safetensors")
            elif inside and fields[0] == "Rss:":
                total += int(fields[1]) * 1024
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="page release is Linux only")
def test_dropped_checkpoint_pages_come_back_intact(tmp_path):
    folder = tiny_model_folder(tmp_path / "tiny", layers=2)
    settings = parse_command_line([str(folder), "--dtypes", "float32"])
    loaded = load_model(resolve_source(settings.model, None, settings.cache_path()), settings)
    reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()  # views into the file
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.inference_mode():
        expected = reference(input_ids=ids).logits
        loaded_before = loaded.model(input_ids=ids).logits
        assert torch.allclose(loaded_before, expected, atol=1e-6)  # column-major: equal up to rounding
        assert resident_checkpoint_bytes() > 0  # the reference read its weights' pages
        release_checkpoint_pages()
        assert resident_checkpoint_bytes() == 0
        assert checkpoint_mappings()  # still mapped: the views stay valid
        assert torch.equal(reference(input_ids=ids).logits, expected)  # its pages came back from the file
        assert torch.equal(loaded.model(input_ids=ids).logits, loaded_before)


def test_a_dtype_that_does_not_work_is_skipped_but_a_bug_surfaces_as_itself(tmp_path, monkeypatch):
    from apostate.model import loading

    folder = tiny_model_folder(tmp_path / "tiny", layers=1)
    settings = parse_command_line([str(folder), "--dtypes", "bfloat16", "--dtypes", "float32"])
    source = resolve_source(settings.model, None, settings.cache_path())
    test_generation = loading._test_generation

    def refuse_bfloat16(model, tokenizer):
        if model.dtype == torch.bfloat16:
            raise ValueError("the test generation produced non-finite logits")
        test_generation(model, tokenizer)

    monkeypatch.setattr(loading, "_test_generation", refuse_bfloat16)
    assert load_model(source, settings).dtype == torch.float32  # bfloat16 did not work: the next dtype

    def bug(*args):
        raise KeyError("a bug in our own code")

    monkeypatch.setattr(loading, "_test_generation", bug)
    with pytest.raises(KeyError, match="a bug in our own code"):
        load_model(source, settings)  # not "could not load with any dtype"
    monkeypatch.setattr(loading, "_test_generation", test_generation)
    monkeypatch.setattr(loading, "_contiguous_head_input", bug)
    with pytest.raises(KeyError, match="a bug in our own code"):
        load_model(source, settings)


@pytest.mark.parametrize("cut", ["header", "data"])
def test_a_cut_short_weight_file_is_named(tmp_path, cut):
    from apostate.errors import ApostateError

    folder = tiny_model_folder(tmp_path / "tiny", layers=1)
    shard = folder / "model.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:40] if cut == "header" else data[: len(data) - 100])
    settings = parse_command_line([str(folder), "--dtypes", "float32"])
    with pytest.raises(ApostateError, match=r"model\.safetensors is damaged or cut short"):
        load_model(resolve_source(settings.model, None, settings.cache_path()), settings)


def test_pages_are_dropped_during_a_load_only_when_it_converts(monkeypatch):
    import time

    from apostate.model import checkpoint_pages

    calls = []
    monkeypatch.setattr(checkpoint_pages, "release_checkpoint_pages", lambda: calls.append(time.monotonic()))
    for converting, expected in ((False, 1), (True, 3)):
        calls.clear()
        with checkpoint_pages.releasing_checkpoint_pages(converting, interval=0.05):
            time.sleep(0.3)
        # A same-dtype load keeps views into the pages: drop them once, after it, never under it.
        assert len(calls) == 1 if not converting else len(calls) >= expected


def test_whether_a_load_converts_is_read_from_the_checkpoint(tmp_path):
    from apostate.model.loading import _converts
    from apostate.model.sources import ModelSource

    folder = tiny_model_folder(tmp_path / "tiny", layers=1)  # saved in float32
    local = ModelSource("tiny", str(folder))
    settings = parse_command_line([str(folder)])
    assert not _converts(local, torch.float32, settings)
    assert not _converts(local, "auto", settings)
    assert _converts(local, torch.bfloat16, settings)
    assert _converts(local, torch.float32, settings.model_copy(update={"quantization": "bnb_4bit"}))
    assert _converts(ModelSource("someone/model", "someone/model"), torch.float32, settings)  # not local: unknown
