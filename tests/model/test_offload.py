"""A model split by accelerate (device_map "auto" with a max_memory too small for it): the layers
that do not fit are offloaded (here, on a CPU-only machine, to disk), their weights on the meta
device between forward passes. Edits are read from accelerate's weight map and written into
LoRA factors on the execution device: the trials score as they do with the whole model in memory."""

from __future__ import annotations

import pytest
from tiny import KL_ROUNDING, SMALL, tiny_model_folder

from apostate.cli import main
from apostate.model.offload import offload_hook
from apostate.search.reading import load_run_study
from apostate.search.study import completed

FLAGS = [*SMALL, "--n-trials", "4", "--seed", "3", "--headless"]
OFFLOADED = ["--device-map", "auto", "--max-memory", '{"cpu": "500KB"}']  # layer 0 stays, layers 1-3 and the head go


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("offload") / "model", layers=4)


def scores(run_dir) -> list[tuple[dict, int, float]]:
    return [(t.params, t.user_attrs["refusals"], t.user_attrs["kl"]) for t in completed(load_run_study(run_dir))]


@pytest.fixture
def plain_kernels(monkeypatch):
    """Both models on the same CPU kernels: offloaded weights come back from disk in their stored
    layout and are never routed, so kernels timed for the whole model would sum differently."""
    from apostate.decoding.kernel_timing import KernelTimer

    monkeypatch.setattr(KernelTimer, "column_major_pays", lambda self, weight: False)
    monkeypatch.setattr(KernelTimer, "onednn_pays", lambda self, weight: (False, False, False))
    monkeypatch.setattr(KernelTimer, "bfloat16_screen_pays", lambda self, weight: False)


@pytest.mark.parametrize("method", ["directional", "ara-lora"])
def test_trials_on_a_partly_offloaded_model_score_as_on_the_whole_model(model_dir, tmp_path, method, plain_kernels):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = [*FLAGS, "--method", method]
    assert main([str(model_dir), "--run-dir", str(whole), *common]) == 0
    offload = ["--offload-folder", str(tmp_path / "offload")]
    assert main([str(model_dir), "--run-dir", str(split), *common, *OFFLOADED, *offload]) == 0

    expected, got = scores(whole), scores(split)
    assert len(got) == len(expected) > 0
    for (params, refusals, kl), (params_split, refusals_split, kl_split) in zip(expected, got, strict=True):
        assert params_split == params and refusals_split == refusals
        assert kl_split == pytest.approx(kl, rel=0, abs=KL_ROUNDING)  # same kernels; weights in other memory


def test_an_offloaded_writer_is_read_from_accelerates_map(model_dir, tmp_path):
    from apostate.model.loading import load_model, load_tokenizer
    from apostate.model.sources import resolve_source
    from apostate.session import open_model
    from apostate.settings import parse_command_line

    settings = parse_command_line([str(model_dir), *SMALL, *OFFLOADED, "--offload-folder", str(tmp_path / "off")])
    source = resolve_source(settings.model, None, settings.cache_path())
    editable = open_model(source, settings, tmp_path)
    offloaded = [slot for slot in editable.adapter.slots if offload_hook(slot.module.get_base_layer())]
    assert offloaded and len(offloaded) < len(editable.adapter.slots)  # part of the model, not all of it
    whole = load_model(source, parse_command_line([str(model_dir), *SMALL]), load_tokenizer(source, settings)).model
    for slot in offloaded:
        weight = slot.base_weight()[0]
        assert weight.device.type == "cpu"
        assert weight.equal(whole.get_submodule(slot.writer.path).weight.float())
        assert slot.module.lora_A["default"].weight.device.type == "cpu"
