"""Ctrl+C and SIGKILL in every phase of a real apostate process (load, start-up, trial, export),
then the same command again: nothing finished is lost, no half-written export sits under the
final name, and the resumed study agrees with an uninterrupted run on every trial both have."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from exports import hashes
from test_end_to_end import load_study
from tiny import SMALL

from apostate.search.study import completed, finished

PAUSING = Path(__file__).with_name("pausing.py")
FLAGS = [*SMALL, "--seed", "7", "--n-trials", "5", "--headless", "--actions", "save", "--max-shard-size", "60KB"]


def command(model_dir: Path, run_dir: Path, *extra: str) -> list[str]:
    return [str(model_dir), "--run-dir", str(run_dir), *FLAGS, *extra]


def start_paused(
    arguments: list[str], phase: str, after: int = 0, sigint_ignored: bool = False
) -> tuple[subprocess.Popen, str]:
    """A real apostate process, once it has paused inside `phase`, and what it printed so far.
    `sigint_ignored`: started as from a background job, which inherits SIGINT ignored."""
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if sigint_ignored else None
    process = subprocess.Popen(
        [sys.executable, str(PAUSING), phase, str(after), "--", *arguments],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=ignore,
    )  # fmt: skip
    watchdog = threading.Timer(180, process.kill)  # a process that never pauses fails the test, not the run
    watchdog.start()
    printed = ""
    for line in process.stdout:
        printed += line
        if line.rstrip().endswith(f"PAUSED {phase}"):  # may follow an open "Trying dtype..." line
            watchdog.cancel()
            return process, printed
    watchdog.cancel()
    process.wait()
    pytest.fail(f"the process ended (code {process.returncode}) before pausing in {phase}:\n{printed}")


def signal_and_wait(process: subprocess.Popen, signum: int) -> tuple[int, str, float]:
    sent = time.monotonic()
    process.send_signal(signum)
    printed, _ = process.communicate(timeout=120)
    return process.returncode, printed, time.monotonic() - sent


def run_to_the_end(arguments: list[str]) -> str:
    done = subprocess.run([sys.executable, "-m", "apostate", *arguments], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def scores(run_dir: Path) -> dict[int, tuple[dict, list[float] | None]]:
    """Every finished trial: number -> (parameters, objective values)."""
    return {t.number: (t.params, t.values) for t in finished(load_study(run_dir))}


def interrupted_line(printed: str) -> str:
    return [line for line in printed.splitlines() if line.startswith("Interrupted.")][-1]


@pytest.fixture(scope="module")
def reference(model_dir, tmp_path_factory):
    """An uninterrupted run of the same command, with its export."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_to_the_end(command(model_dir, run_dir))
    return run_dir


@pytest.mark.parametrize("phase", ["load", "start-up", "trial"])
def test_ctrl_c_then_a_kill_then_the_same_command_loses_nothing(phase, model_dir, reference, tmp_path, bad_input):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # The reference's CPU kernel choices: timed again, a close one could flip, and a KL's last digits with it.
    shutil.copy(reference / "kernels.json", run_dir)
    arguments = command(model_dir, run_dir)
    after = 2 if phase == "trial" else 0  # a trial is interrupted once two have finished

    process, _ = start_paused(arguments, phase, after)
    code, printed, seconds = signal_and_wait(process, signal.SIGINT)
    assert code == 130 and seconds < 20 and "Traceback" not in printed, printed
    bad_input.signalled("signal", f"Ctrl+C during {phase}", code, interrupted_line(printed))
    kept = scores(run_dir)
    assert len(kept) == after

    process, _ = start_paused(arguments, phase, after + 1 if phase == "trial" else 0)
    killed = scores(run_dir)
    code, _, _ = signal_and_wait(process, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert scores(run_dir) == killed  # the kill lost none of what had finished

    printed = run_to_the_end(arguments)
    resumed = scores(run_dir)
    assert len(resumed) == 5
    assert all(resumed[number] == values for number, values in killed.items())  # intact
    assert (run_dir / "model" / "apostate.json").is_file() and not list(run_dir.glob(".model.*"))
    said = next(line.strip() for line in printed.splitlines() if line.strip().startswith("Running "))
    bad_input.signalled("signal", f"SIGKILL during {phase}", code, f"(killed, prints nothing); run again: {said}")

    uninterrupted = scores(reference)
    shared = [n for n, (params, _) in resumed.items() if n in uninterrupted and uninterrupted[n][0] == params]
    assert all(resumed[n] == uninterrupted[n] for n in shared)  # same parameters, the same scores
    if phase != "trial":  # nothing had finished before the kills: the whole run is the uninterrupted one
        assert resumed == uninterrupted
    assert {0, 1} <= set(shared)
    assert front(run_dir, shared) == front(reference, shared)


def front(run_dir: Path, numbers: list[int]) -> list[tuple[int, list[float]]]:
    trials = [t for t in completed(load_study(run_dir)) if t.number in numbers]
    return sorted(
        (t.number, t.values)
        for t in trials
        if not any(o.values[0] <= t.values[0] and o.values[1] <= t.values[1] and o.values != t.values for o in trials)
    )


def test_ctrl_c_and_a_kill_during_an_export_keep_the_previous_export(model_dir, reference, tmp_path, bad_input):
    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    model = run_dir / "model"
    before, exported = hashes(model), json.loads((model / "apostate.json").read_text())["trial"]
    other = next(t.number for t in completed(load_study(run_dir)) if t.number != exported)
    arguments = command(model_dir, run_dir, "--trial", str(other))

    process, _ = start_paused(arguments, "export")
    code, printed, seconds = signal_and_wait(process, signal.SIGINT)
    assert code == 130 and seconds < 20 and "Traceback" not in printed, printed
    assert hashes(model) == before and not list(run_dir.glob(".model.*"))  # partial folder removed
    bad_input.signalled("signal", "Ctrl+C during export", code, interrupted_line(printed))

    process, _ = start_paused(arguments, "export")
    assert len(list(run_dir.glob(".model.partial-*/*.safetensors"))) == 1  # one shard written, then paused
    code, _, _ = signal_and_wait(process, signal.SIGKILL)
    assert hashes(model) == before  # the final name still holds the previous export, whole

    printed = run_to_the_end(arguments)
    assert json.loads((model / "apostate.json").read_text())["trial"] == other
    assert not list(run_dir.glob(".model.*"))  # the killed export's partial folder is cleaned up
    said = next(line.strip() for line in printed.splitlines() if line.startswith("Saved to"))
    bad_input.signalled("signal", "SIGKILL during export", code, f"(killed, prints nothing); run again: {said}")


def test_ctrl_c_reaches_the_process_even_from_a_background_job(model_dir, tmp_path):
    process, _ = start_paused(command(model_dir, tmp_path / "run"), "load", sigint_ignored=True)
    code, printed, seconds = signal_and_wait(process, signal.SIGINT)
    assert code == 130 and seconds < 20 and "Interrupted." in printed, printed


def test_sigterm_is_answered_like_ctrl_c(model_dir, tmp_path, bad_input):
    run_dir = tmp_path / "run"
    process, _ = start_paused(command(model_dir, run_dir), "trial", 1)
    code, printed, seconds = signal_and_wait(process, signal.SIGTERM)
    assert code == 130 and seconds < 20 and "Traceback" not in printed, printed
    assert len(scores(run_dir)) == 1
    bad_input.signalled("signal", "SIGTERM (`kill PID`) during trial", code, interrupted_line(printed))
