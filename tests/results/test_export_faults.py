"""Exports that fail partway (full disk, read-only folder, Ctrl-C) keep the previous export
intact and leave nothing half-written; a bad output path is refused before any work."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from exports import hashes
from filesystems import mounted_tmpfs
from test_export import SUMMARY, random_edits, state_dict_of
from tiny import tiny_model_folder, tiny_tokenizer
from transformers import AutoModelForCausalLM

from apostate.errors import ApostateError
from apostate.model.adapter import attach_adapter
from apostate.model.architecture import discover
from apostate.model.sources import ModelSource
from apostate.results import export, merge
from apostate.results.export import save_adapter, save_merged


def leftovers(parent: Path, name: str) -> list[str]:
    """Temporary folders an export of `parent / name` may have left behind."""
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}.") or "partial" in p.name)


@pytest.fixture
def tiny(tmp_path):
    folder = tiny_model_folder(tmp_path / "tiny")
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return ModelSource("tiny", str(folder)), base


def fail_after_first_shard(monkeypatch, error: BaseException) -> None:
    real, calls = merge._write_shard, []

    def write_shard(path, *args):
        if calls:
            raise error
        calls.append(path)
        real(path, *args)

    monkeypatch.setattr(merge, "_write_shard", write_shard)


def assert_one_line(error: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(error.value)
    assert isinstance(error.value, ApostateError) and "\n" not in message
    for part in parts:
        assert part in message, message


def test_a_merge_failing_partway_keeps_the_previous_export_intact(tiny, tmp_path, monkeypatch):
    source, base = tiny
    out = tmp_path / "exports" / "model"
    save_merged(source, random_edits(base, seed=0), tiny_tokenizer(), out, "60KB", SUMMARY)
    before = hashes(out)
    assert len([f for f in before if f.endswith(".safetensors")]) > 2

    fail_after_first_shard(monkeypatch, OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(ApostateError) as error:
        save_merged(source, random_edits(base, seed=1), tiny_tokenizer(), out, "60KB", SUMMARY)
    assert_one_line(error, str(out), "disk is full", "previous export there is unchanged")
    assert hashes(out) == before
    assert leftovers(out.parent, "model") == []

    fresh = tmp_path / "exports" / "fresh"  # no previous export: nothing at all under the final name
    with pytest.raises(ApostateError):
        save_merged(source, random_edits(base, seed=1), tiny_tokenizer(), fresh, "60KB", SUMMARY)
    assert not fresh.exists() and leftovers(out.parent, "fresh") == []


def test_an_interrupted_merge_keeps_the_previous_export_and_removes_its_partial_folder(tiny, tmp_path, monkeypatch):
    source, base = tiny
    out = tmp_path / "model"
    save_merged(source, random_edits(base, seed=0), tiny_tokenizer(), out, "60KB", SUMMARY)
    before = hashes(out)
    fail_after_first_shard(monkeypatch, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save_merged(source, random_edits(base, seed=1), tiny_tokenizer(), out, "60KB", SUMMARY)
    assert hashes(out) == before
    assert leftovers(tmp_path, "model") == []


def test_what_a_killed_export_left_is_cleaned_up_and_a_moved_aside_export_put_back(tiny, tmp_path, capsys):
    source, base = tiny
    out = tmp_path / "model"
    save_merged(source, random_edits(base, seed=0), tiny_tokenizer(), out, "60KB", SUMMARY)
    before = hashes(out)
    # A SIGKILL between `_swap_in`'s two renames: the old export aside, nothing under the final name.
    holder = tmp_path / ".model.old-killed"
    holder.mkdir()
    out.rename(holder / "model")
    (tmp_path / ".model.partial-killed").mkdir()
    (tmp_path / ".model.partial-killed" / "model-00001-of-00009.safetensors").write_bytes(b"half")

    fail = KeyboardInterrupt()
    with pytest.MonkeyPatch.context() as patch:
        fail_after_first_shard(patch, fail)
        with pytest.raises(KeyboardInterrupt):  # the next export puts the old one back first
            save_merged(source, random_edits(base, seed=1), tiny_tokenizer(), out, "60KB", SUMMARY)
    assert "Put the previous export back" in capsys.readouterr().err
    assert hashes(out) == before
    assert leftovers(tmp_path, "model") == []


def test_a_successful_export_replaces_the_previous_one_and_leaves_no_temporary_folders(tiny, tmp_path, monkeypatch):
    source, base = tiny
    out = tmp_path / "model"
    save_merged(source, random_edits(base, seed=0), tiny_tokenizer(), out, "60KB", SUMMARY)
    (out / "stale.txt").write_text("from the previous export")
    first, before, seen = state_dict_of(out), hashes(out), []
    real = merge._write_shard

    def write_shard(path, *args):  # while the new export is written, the old one stays whole
        seen.append(hashes(out) == before and not path.is_relative_to(out))
        real(path, *args)

    monkeypatch.setattr(merge, "_write_shard", write_shard)
    edits = random_edits(base, seed=1)
    assert save_merged(source, edits, tiny_tokenizer(), out, "5GB", SUMMARY) == out
    assert seen == [True]
    second = state_dict_of(out)
    assert not (out / "stale.txt").exists() and not (out / merge.INDEX_NAME).exists()  # nothing of the old one
    assert (out / "apostate.json").is_file() and (out / "config.json").is_file()
    name = merge.parameter_name(edits[0].writer)
    assert not torch.equal(first[name], second[name])
    assert torch.allclose(second[name], base.state_dict()[name] + edits[0].compute(), atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "tiny"]


def test_adapter_export_is_swapped_in_too_and_a_read_only_failure_keeps_the_old_one(
    tiny, tmp_path, monkeypatch, bad_input
):
    source, base = tiny
    adapter = attach_adapter(base, discover(base), 1)
    out = tmp_path / "adapter"
    save_adapter(source, adapter, tiny_tokenizer(), out, SUMMARY)
    (out / "stale.txt").write_text("old")
    save_adapter(source, adapter, tiny_tokenizer(), out, SUMMARY)
    assert not (out / "stale.txt").exists() and (out / "adapter_config.json").is_file()
    before = hashes(out)

    tokenizer = tiny_tokenizer()
    monkeypatch.setattr(tokenizer, "save_pretrained", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, "ro")))
    with pytest.raises(ApostateError) as error:
        save_adapter(source, adapter, tokenizer, out, SUMMARY)
    assert_one_line(error, str(out), "not writable")
    bad_input.raised("export", "a read-only folder during an export", error)
    assert hashes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "tiny"]


def test_a_disk_full_error_from_safetensors_rust_writer_is_one_clear_line(tiny, tmp_path, monkeypatch):
    source, base = tiny
    out = tmp_path / "model"
    save_merged(source, random_edits(base), tiny_tokenizer(), out, "5GB", SUMMARY)
    before = hashes(out)
    message = 'Error while serializing: I/O error: No space left on device (os error 28) at path "x"'

    def rust_error(*args, **kwargs):  # what safetensors' save_file raises (not an OSError)
        raise RuntimeError(message)

    monkeypatch.setattr(export, "_write_card", rust_error)
    with pytest.raises(ApostateError) as error:
        save_merged(source, random_edits(base, seed=1), tiny_tokenizer(), out, "5GB", SUMMARY)
    assert_one_line(error, str(out), "disk is full")
    assert hashes(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["model", "tiny"]


def test_an_output_path_that_is_a_file_is_refused_before_any_work(tiny, tmp_path, monkeypatch):
    from apostate.results.export import check_output_dir

    source, base = tiny
    file = tmp_path / "model.safetensors"
    file.write_text("not a folder")
    for path in (file, file / "below"):
        with pytest.raises(ApostateError) as error:
            check_output_dir(path)
        assert_one_line(error, str(file), "is a file", "--output-dir")
    check_output_dir(tmp_path / "new" / "model")  # missing folders are fine: the export creates them

    def no_work(*args):
        raise AssertionError("work started before the output path was checked")

    monkeypatch.setattr(export, "_checkpoint_folder", no_work)
    with pytest.raises(ApostateError) as error:
        save_merged(source, random_edits(base), tiny_tokenizer(), file, "5GB", SUMMARY)
    assert_one_line(error, str(file), "is a file")
    assert file.read_text() == "not a folder"

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ApostateError) as error:
        save_merged(source, random_edits(base), tiny_tokenizer(), other, "5GB", SUMMARY)
    assert_one_line(error, str(other), "not an earlier apostate export")
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs: room for one tiny export and a little more."""
    with mounted_tmpfs(tmp_path / "small", "size=2m") as disk:
        yield disk


def fill(disk: Path) -> None:
    with (disk / "filler").open("wb", buffering=0) as file:
        for block in (1 << 16, 1 << 12, 1 << 9):
            try:
                while True:
                    file.write(b"\0" * block)
            except OSError as error:
                assert error.errno == errno.ENOSPC


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "in-memory"])
def test_a_real_full_disk_keeps_the_previous_export(tiny, small_disk, monkeypatch, streamed, bad_input):
    source, base = tiny
    out = small_disk / "model"
    save_merged(source, random_edits(base, seed=0), tiny_tokenizer(), out, "5GB", SUMMARY)
    before = hashes(out)
    fill(small_disk)
    if not streamed:  # save_pretrained writes through safetensors' Rust writer
        monkeypatch.setattr(export, "_why_not_streamable", lambda *args: "forced by the test")
    with pytest.raises(ApostateError) as error:
        save_merged(source, random_edits(base, seed=1), tiny_tokenizer(), out, "5GB", SUMMARY)
    assert_one_line(error, str(out), "disk is full", "free some space")
    way = "streamed merge" if streamed else "in-memory merge"
    bad_input.raised("export", f"a full disk (a real 2 MB tmpfs) during an export ({way})", error)
    assert hashes(out) == before
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler", "model"]
    with pytest.raises(ApostateError, match="mount point"):  # it could not be swapped: refused up front
        export.check_output_dir(small_disk)
