"""The run folder under faults and mistakes: a torn journal, --show-results, a failed first run,
and choices that cannot work refused before the model loads."""

from __future__ import annotations

import contextlib
import errno
import json
from pathlib import Path

import pytest
from filesystems import mounted_tmpfs
from tiny import SMALL

from apostate.cli import main
from apostate.commands import run as pipeline
from apostate.errors import ApostateError
from apostate.search.study import JOURNAL, repair_journal
from apostate.settings import parse_command_line


@pytest.fixture(scope="module")
def finished_run(model_dir, tmp_path_factory):
    """A run folder with two finished trials and a saved model."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    flags = ["--n-trials", "2", "--headless", "--actions", "save"]
    assert main([str(model_dir), "--run-dir", str(run_dir), *SMALL, *flags]) == 0
    return run_dir


def finished_trials(journal) -> int:
    states = [json.loads(line) for line in journal.read_text().splitlines()]
    return sum(1 for r in states if r.get("op_code") == 6 and r.get("state") in (1, 2))


def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(pipeline, "start_session", refuse)


def test_a_torn_last_journal_record_is_set_aside_and_the_run_resumes(model_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main([str(model_dir), "--run-dir", str(run_dir), *SMALL, "--n-trials", "2", "--headless"]) == 0
    journal = run_dir / JOURNAL
    text = journal.read_text()
    journal.write_text(text + text.splitlines()[-1][:40])  # a kill in the middle of writing a record
    capsys.readouterr()
    assert main([str(model_dir), "--run-dir", str(run_dir), *SMALL, "--n-trials", "3", "--headless"]) == 0
    assert "2 finished trials recovered" in capsys.readouterr().err
    assert finished_trials(journal) == 3  # nothing lost, one trial added
    assert len(list(run_dir.glob(f"{JOURNAL}.torn-*"))) == 1


def test_a_broken_record_before_the_end_is_an_error_not_a_repair(tmp_path):
    journal = tmp_path / JOURNAL
    journal.write_text('{"op_code": 0}\n{"op_co\n{"op_code": 1}\n')
    with pytest.raises(ApostateError, match="damaged record at line 2"):
        repair_journal(journal)
    journal.write_text('{"op_code": 0}\n{"op_code": 6, "state": 1}\n')
    repair_journal(journal)  # an intact journal is left as it is
    assert journal.read_text() == '{"op_code": 0}\n{"op_code": 6, "state": 1}\n'


def test_show_results_only_shows(model_dir, finished_run, monkeypatch, capsys):
    saved = (finished_run / "model" / "apostate.json").stat().st_mtime_ns
    no_model_load(monkeypatch)
    flags = ["--headless", "--actions", "save", "--actions", "evaluate", "--show-results"]
    assert main([str(model_dir), "--run-dir", str(finished_run), *SMALL, "--n-trials", "2", *flags]) == 0
    assert "Pareto front" in capsys.readouterr().err
    assert (finished_run / "model" / "apostate.json").stat().st_mtime_ns == saved  # not exported again


def test_show_results_of_an_empty_run_folder_is_one_line(model_dir, tmp_path, bad_input):
    code = main([str(model_dir), "--run-dir", str(tmp_path / "run"), *SMALL, "--show-results"])
    assert "holds no study yet" in bad_input.error("run folder", "--show-results on a folder with no study", code)


def test_a_run_that_failed_before_measuring_anything_does_not_block_the_corrected_one(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    wrong = ["--harmful.source", str(tmp_path / "missing.txt")]
    assert main([str(model_dir), "--run-dir", str(run_dir), *SMALL, "--n-trials", "2", *wrong]) == 2
    assert main([str(model_dir), "--run-dir", str(run_dir), *SMALL, "--n-trials", "2", "--headless"]) == 0


def test_changed_settings_after_measuring_are_still_refused(model_dir, finished_run, bad_input):
    code = main([str(model_dir), "--run-dir", str(finished_run), *SMALL, "--n-trials", "2", "--kl-cutoff", "1"])
    line = bad_input.error("run folder", "resuming with a setting that changes what trials measure", code)
    assert "other settings (changed: kl_cutoff)" in line


def test_an_output_dir_that_is_a_file_is_refused_before_the_model_loads(
    model_dir, finished_run, tmp_path, monkeypatch, bad_input
):
    target = tmp_path / "a-file"
    target.write_text("not a folder")
    no_model_load(monkeypatch)
    flags = ["--n-trials", "2", "--headless", "--actions", "save", "--output-dir", str(target)]
    with pytest.raises(ApostateError, match="a-file") as error:
        pipeline.run(parse_command_line([str(model_dir), "--run-dir", str(finished_run), *SMALL, *flags]))
    bad_input.raised("export", "--output-dir naming a file", error)


def test_an_unknown_trial_is_refused_before_the_model_loads(model_dir, finished_run, monkeypatch, bad_input):
    no_model_load(monkeypatch)
    flags = ["--n-trials", "2", "--headless", "--trial", "99", "--actions", "save"]
    code = main([str(model_dir), "--run-dir", str(finished_run), *SMALL, *flags])
    line = bad_input.error("run folder", "--trial naming no finished trial", code)
    assert "trial 99 is not a finished trial of this run (finished: " in line


def test_a_run_folder_in_use_is_refused(model_dir, finished_run, bad_input):
    from apostate.search.study import lock_run_dir

    holder = lock_run_dir(finished_run)  # what another apostate process holds while it runs
    try:
        code = main([str(model_dir), "--run-dir", str(finished_run), *SMALL, "--n-trials", "2", "--headless"])
    finally:
        holder.close()
    line = bad_input.error("run folder", "a run folder another apostate process is using", code)
    assert f"run folder {finished_run} is in use by another apostate process" in line


def test_a_journal_damaged_in_the_middle_is_one_line_and_left_alone(model_dir, tmp_path, bad_input):
    run_dir = tmp_path / "run"
    assert main([str(model_dir), "--run-dir", str(run_dir), *SMALL, "--n-trials", "2", "--headless"]) == 0
    journal = run_dir / JOURNAL
    lines = journal.read_text().splitlines(keepends=True)
    lines[3] = lines[3][:20] + "\n"
    journal.write_text("".join(lines))
    damaged = journal.read_bytes()
    code = main([str(model_dir), "--run-dir", str(run_dir), *SMALL, "--n-trials", "3", "--headless"])
    line = bad_input.error("run folder", "a study journal damaged before its last record", code)
    assert "damaged record at line 4" in line and "restore the file from a backup" in line
    assert journal.read_bytes() == damaged  # nothing was appended to it, nothing cut off


@pytest.mark.parametrize(
    ("where", "what", "expected"),
    [
        ("proc", "a run folder on a special file system (/proc)", "the file system there does not take new folders"),
        ("file", "a run folder that is a file", "is a file; give a folder path with --run-dir"),
        ("under-file", "a run folder below a file", "is a file, not a folder; choose another --run-dir"),
        ("read-only", "a run folder on a read-only file system", "the file system there is read-only"),
        ("no-permission", "a run folder where writing is not permitted", "permission denied"),
    ],
    ids=["proc", "file", "under-file", "read-only", "no-permission"],
)
def test_a_run_folder_that_cannot_be_created_is_one_line(model_dir, tmp_path, bad_input, where, what, expected):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    with contextlib.ExitStack() as mounted:
        if where == "read-only":
            run_dir = mounted.enter_context(mounted_tmpfs(tmp_path / "read-only", "size=1m,ro")) / "run"
        else:
            run_dir = _run_dir(where, a_file)
        code = main([str(model_dir), "--run-dir", str(run_dir), *SMALL])
        line = bad_input.error("run folder", what, code)
    assert f"{run_dir}" in line and expected in line
    assert a_file.read_text() == "not a folder"


def _run_dir(where: str, a_file: Path) -> Path:
    if where == "no-permission":  # sysfs refuses new folders to everyone, root too (who writes anywhere else)
        if _mkdir_errno(Path("/sys/apostate-run")) not in (errno.EACCES, errno.EPERM):
            pytest.skip("/sys here does not refuse a new folder for want of permission")
        return Path("/sys/apostate-run")
    return {"proc": Path("/proc/apostate-run"), "file": a_file, "under-file": a_file / "run"}[where]


def _mkdir_errno(path: Path) -> int | None:
    try:
        path.mkdir()
    except OSError as error:
        return error.errno
    path.rmdir()
    return None
