"""--actions save-gguf on a model that came in as GGUF: the file, its Modelfile and card, scored as
shipped (loaded back, beside the full-precision model on the same prompts); reproduce checks its
sha256; a failed write keeps the earlier export; upload publishes the folder; a model that did not
come in as GGUF is refused with one line."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json

import gguf
import pytest
from exports import hashes
from hub_stub import TOKEN, HubStub
from test_end_to_end import load_study
from test_upload import no_login_store
from tiny import SMALL
from tiny_gguf import tiny_gguf

import apostate.results.export as export
from apostate.cli import main
from apostate.search.study import completed


def apostate(base, run_dir, *flags):
    return main([str(base), "--run-dir", str(run_dir), *SMALL, "--n-trials", "2", "--headless",
                 "--cache-dir", str(run_dir.parent / "cache"), *flags])  # fmt: skip


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf-export")
    base = tiny_gguf(root / "tiny.gguf", layers=4)
    run_dir = root / "run"
    with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()) as out:
        code = apostate(base, run_dir, "--actions", "save-gguf")
    return code, base, run_dir, out.getvalue() + err.getvalue()


def test_save_gguf_writes_the_file_a_modelfile_and_a_card(shipped):
    code, _, run_dir, out = shipped
    assert code == 0, out
    folder = run_dir / "gguf"
    assert sorted(p.name for p in folder.iterdir()) == [
        "Modelfile", "README.md", "apostate.json", "reproduce.json", "tiny-Q8_0.gguf"]  # fmt: skip
    reader = gguf.GGUFReader(folder / "tiny-Q8_0.gguf")
    assert reader.get_field("general.file_type").contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert (folder / "Modelfile").read_text().startswith("FROM ./tiny-Q8_0.gguf\n")
    card = (folder / "README.md").read_text()
    assert "library_name: gguf" in card and "- gguf" in card
    assert "llama-cli -m tiny-Q8_0.gguf" in card and "ollama create tiny -f Modelfile" in card
    record = json.loads((folder / "reproduce.json").read_text())
    digest = hashlib.sha256((folder / "tiny-Q8_0.gguf").read_bytes()).hexdigest()
    assert record["export"] == "gguf" and record["files_sha256"] == {"tiny-Q8_0.gguf": digest}


def test_the_file_is_scored_as_shipped_beside_the_full_precision_model(shipped):
    code, _, run_dir, out = shipped
    assert code == 0, out
    scores = json.loads((run_dir / "gguf" / "apostate.json").read_text())["scores"]
    study = load_study(run_dir)
    trial = json.loads((run_dir / "gguf" / "apostate.json").read_text())["trial"]
    record = next(t for t in completed(study) if t.number == trial).user_attrs
    full = scores["evaluation (short check), full precision"]
    assert full["refusals"] == record["refusals"] and full["total"] == record["total"]
    assert full["kl"] == pytest.approx(record["kl"], abs=1e-6), "the same scorer as the search"
    for split in ("evaluation", "held-out"):
        file_row = scores[f"{split} (short check), GGUF q8_0"]
        full_row = scores[f"{split} (short check), full precision"]
        assert file_row["total"] == full_row["total"] == 6
        assert 0 <= file_row["kl"] < 0.1 and file_row["kl"] != full_row["kl"], "scored from the file itself"
    assert study.user_attrs[f"gguf_{trial}"]["rows"].keys() == {
        "evaluation (short check), full precision", "evaluation (short check), GGUF q8_0",
        "held-out (short check), full precision", "held-out (short check), GGUF q8_0"}  # fmt: skip
    printed = (
        f"* held-out (short check), GGUF q8_0: refusals {scores['held-out (short check), GGUF q8_0']['refusals']}/6"
    )
    assert printed in out, "the run shows the rows, not only the card"
    card = (run_dir / "gguf" / "README.md").read_text()
    assert "| held-out (short check), GGUF q8_0 |" in card
    assert f"trial {trial}, GGUF q8_0" in (run_dir / "report" / "index.html").read_text()


def test_reproduce_rebuilds_the_gguf_and_checks_its_hash(shipped, tmp_path):
    code, _, run_dir, out = shipped
    assert code == 0, out
    rebuilt = tmp_path / "rebuilt"
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        assert main(["reproduce", str(run_dir / "gguf"), "--output-dir", str(rebuilt)]) == 0
    assert "Reproduced" in out.getvalue() + err.getvalue()
    assert hashes(rebuilt)["tiny-Q8_0.gguf"] == hashes(run_dir / "gguf")["tiny-Q8_0.gguf"]


def test_a_failed_write_keeps_the_earlier_export_and_leaves_no_partial_file(shipped, monkeypatch, bad_input):
    code, base, run_dir, out = shipped
    assert code == 0, out
    before = hashes(run_dir / "gguf")

    def disk_full(base_file, edits, output_file, choice):
        output_file.write_bytes(b"GGUF" + bytes(100))  # half-written
        raise OSError(errno.ENOSPC, "No space left on device", str(output_file))

    monkeypatch.setattr(export, "write_gguf", disk_full)
    code = apostate(base, run_dir, "--actions", "save-gguf")
    line = bad_input.error("export", "a full disk while writing a GGUF export", code)
    assert "the disk is full" in line and "previous export there is unchanged" in line
    assert hashes(run_dir / "gguf") == before
    assert not [p for p in run_dir.iterdir() if p.name.startswith(".gguf")], "no partial folder left"


def test_upload_publishes_the_gguf_folder(shipped, tmp_path, monkeypatch):
    import huggingface_hub

    code, base, run_dir, out = shipped
    assert code == 0, out
    with HubStub() as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.url)
        no_login_store(monkeypatch, tmp_path / "hf-home")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()) as out:
            code = apostate(
                base, run_dir, "--actions", "upload", "--upload.export", "gguf", "--upload.repo", "user/tiny-gguf"
            )
        assert code == 0
        assert "Writing tiny-Q8_0.gguf" not in err.getvalue() + out.getvalue(), "the saved export is uploaded as it is"
        files = hub.repos["user/tiny-gguf"].files
    folder = run_dir / "gguf"
    assert set(files) == {"Modelfile", "README.md", "apostate.json", "reproduce.json", "tiny-Q8_0.gguf"}
    assert files["tiny-Q8_0.gguf"] == (folder / "tiny-Q8_0.gguf").read_bytes()


def test_a_model_that_did_not_come_in_as_gguf_is_one_line(model_dir, tmp_path, bad_input):
    code = main([str(model_dir), "--run-dir", str(tmp_path / "run"), *SMALL, "--n-trials", "2",
                 "--headless", "--actions", "save-gguf"])  # fmt: skip
    line = bad_input.error("export", "save-gguf for a model that did not come in as GGUF", code)
    assert "GGUF export needs a model that came in as a GGUF file" in line
    assert not (tmp_path / "run" / "startup.pt").exists(), "refused before the model loads"
