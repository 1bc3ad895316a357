"""Workers sharing one study through PostgreSQL (--storage), as real processes on a tiny model:
the study reaches n_trials exactly, every trial number once; one worker measures the start-up
and the others fetch it; a worker killed mid-trial has its trial run again by another; a worker
with other settings or another model is refused; the database lost mid-run stops a worker in
one line with its finished trials kept; and a process that never ran a trial shows the front,
exports the chosen trial and writes the report. The server is the real one (tests/postgres_server.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pytest
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from postgres_server import free_port
from sqlalchemy.engine import make_url
from tiny import SMALL, tiny_model_folder

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
PAUSING = Path(__file__).with_name("pausing.py")
STUDY = "shared"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("workers") / "model")


def flags(url: str, n_trials: int, *extra: str) -> list[str]:
    return [*SMALL, "--n-trials", str(n_trials), "--storage", url, "--study-name", STUDY,
            "--heartbeat-seconds", "1", "--headless", *extra]  # fmt: skip


def start(model: str, run_dir: Path, url: str, n_trials: int, phase: str = "slow", after: int = 3, cwd=None, extra=()):
    """A worker process; `phase`/`after`: see tests/pausing.py (by default each trial takes 0.3 s more)."""
    args = [sys.executable, str(PAUSING), phase, str(after), "--", model, "--run-dir", str(run_dir)]
    return subprocess.Popen(
        [*args, *flags(url, n_trials), *extra], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=cwd
    )


def apostate(*args: str, env=None, cwd=None) -> subprocess.CompletedProcess:
    """apostate in a process of its own; what it printed, stdout and stderr together, in `stdout`."""
    return subprocess.run(
        [sys.executable, "-m", "apostate", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300, env=env, cwd=cwd,
    )  # fmt: skip


def finish(process: subprocess.Popen) -> str:
    printed, _ = process.communicate(timeout=300)
    assert process.returncode == 0, printed
    return printed


def trials(url: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=STUDY, storage=url).get_trials(deepcopy=False)


def finished(all_trials) -> list[optuna.trial.FrozenTrial]:
    return [t for t in all_trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]


def wait_for_line(process: subprocess.Popen, text: str, timeout: float = 180) -> str:
    printed, deadline = "", time.monotonic() + timeout
    for line in process.stdout:
        printed += line
        if text in line:
            return printed
        assert time.monotonic() < deadline, f"no line with {text!r} in time:\n{printed}"
    pytest.fail(f"the worker ended (code {process.wait()}) before printing {text!r}:\n{printed}")


def dashboard_view(url: str) -> dict:
    """The study as optuna-dashboard serves it (its JSON API, what its pages draw)."""
    port = free_port()
    dashboard = Path(sys.executable).with_name("optuna-dashboard")
    command = [str(dashboard), url, "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                studies = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=5))
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "optuna-dashboard did not start"
                time.sleep(0.2)
        study_id = next(s["study_id"] for s in studies["study_summaries"] if s["study_name"] == STUDY)
        page = urllib.request.urlopen(f"http://127.0.0.1:{port}/dashboard/studies/{study_id}", timeout=30)
        assert page.status == 200
        return json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}", timeout=30))
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_two_workers_share_the_trials_and_a_third_process_shows_exports_and_reports(
    postgres_server, model_dir, tmp_path
):
    url, n = postgres_server.create_database(), 10
    shared_folder = tmp_path / "workers"  # both workers on this machine share one run folder
    workers = [start(str(model_dir), shared_folder, url, n) for _ in range(2)]  # at the same moment
    printed = [finish(worker) for worker in workers]

    everything = trials(url)
    assert sorted(t.number for t in everything) == list(range(len(everything)))  # each number once
    assert len(finished(everything)) == n  # the study's n_trials, not each worker's
    assert all(t.state != TrialState.FAIL or t.user_attrs.get("surplus") for t in everything)
    assert not [t for t in everything if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert len({t.user_attrs["worker"] for t in finished(everything)}) == 2  # both ran trials
    assert len({tuple(sorted(t.params.items())) for t in finished(everything)}) == n  # no repeated parameters

    view = dashboard_view(url)
    assert view["objective_names"] == ["refused share", "KL divergence"]
    assert len(view["trials"]) == len(everything)
    scored = next(t for t in view["trials"] if t["state"] == "Complete")
    assert {"kl", "refusals", "seconds", "worker", "parameters"} <= {a["key"] for a in scored["user_attrs"]}
    assert "startup" in {a["key"] for a in view["user_attrs"]}

    measured = [text for text in printed if "This worker measures the study's start-up" in text]
    fetched = [text for text in printed if "Start-up quantities from the study" in text]
    assert len(measured) == 1 and len(fetched) == 1, printed
    agreed = re.search(r"base model agrees with the study's \(first-token KL ([0-9.e+-]+)\)", fetched[0])
    assert agreed and float(agreed.group(1)) < 1e-6  # 0 up to the rounding of kernels timed apart
    assert make_url(url).password not in "".join(printed)  # the storage's password is never printed

    # A third process, which never ran a trial: the front, an export, the report.
    third = tmp_path / "third"
    shown = apostate(str(model_dir), "--run-dir", str(third), *flags(url, n), "--show-results")
    assert shown.returncode == 0, shown.stdout
    front = json.loads((third / "pareto.json").read_text())["pareto"]
    assert front and (third / "report" / "index.html").is_file()
    stored = json.loads((third / "storage.json").read_text())
    assert stored["study_name"] == STUDY and make_url(url).password not in json.dumps(stored)

    exported = apostate(str(model_dir), "--run-dir", str(third), *flags(url, n), "--actions", "save")
    assert exported.returncode == 0, exported.stdout
    assert "Start-up quantities from the study" in exported.stdout and "Running" not in exported.stdout
    record = json.loads((third / "model" / "apostate.json").read_text())
    assert record["trial"] in {t["number"] for t in front}

    (third / "report" / "index.html").unlink()
    env = {**os.environ, "PGPASSWORD": make_url(url).password}  # storage.json keeps no password
    report = apostate("report", str(third), env=env)
    assert report.returncode == 0, report.stdout
    assert "Pareto front" in (third / "report" / "index.html").read_text()


def test_a_killed_worker_trial_is_run_again_by_another(postgres_server, model_dir, tmp_path):
    url, n = postgres_server.create_database(), 6
    victim = start(str(model_dir), tmp_path / "victim", url, n, phase="trial", after=2)
    wait_for_line(victim, "PAUSED trial")
    time.sleep(1.5)  # its heartbeat thread has beaten (a trial never beaten never goes stale)
    victim.kill()  # SIGKILL: the trial stays RUNNING
    victim.communicate()
    hanging = [t for t in trials(url) if t.state == TrialState.RUNNING]
    assert len(hanging) == 1

    finish(start(str(model_dir), tmp_path / "survivor", url, n, after=0))
    everything = trials(url)
    assert len(finished(everything)) == n
    assert [t.number for t in everything if t.state == TrialState.FAIL] == [hanging[0].number]
    retried = [t for t in everything if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == hanging[0].number]
    assert len(retried) == 1 and retried[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retried[0].user_attrs["worker"] != hanging[0].user_attrs["worker"]  # the survivor ran it
    assert sorted(t.number for t in everything) == list(range(len(everything)))


def test_ara_workers_capture_their_own_activations_and_check_them_against_the_studys(
    postgres_server, model_dir, tmp_path
):
    url = postgres_server.create_database()
    ara = ["--method", "ara-lora"]
    finish(start(str(model_dir), tmp_path / "first", url, 2, after=0, extra=ara))
    assert "prepared" in optuna.load_study(study_name=STUDY, storage=url).user_attrs
    joined = finish(start(str(model_dir), tmp_path / "second", url, 4, after=0, extra=[*ara, "--n-trials", "4"]))
    assert "What this worker prepared for its method agrees with the study's" in joined
    assert len(finished(trials(url))) == 4


def test_workers_with_other_settings_or_another_model_are_refused(postgres_server, model_dir, tmp_path, bad_input):
    url = postgres_server.create_database("other_settings")
    finish(start(str(model_dir), tmp_path / "first", url, 3, after=0))

    other_setting = apostate(str(model_dir), "--run-dir", str(tmp_path / "b"), *flags(url, 3), "--kl-cutoff", "1.5")
    line = bad_input.printed(
        "workers", "a worker with another kl_cutoff", other_setting.returncode, other_setting.stdout
    )
    assert line == (
        f"apostate: error: study {STUDY} was made with other settings (changed: kl_cutoff); "
        "give this worker the study's settings, or another --study-name"
    )

    # Same name, other weights: a folder called `model` under another parent.
    url = postgres_server.create_database("other_model")
    impostor = tiny_model_folder(tmp_path / "elsewhere" / "model", seed=1)
    same_name = tmp_path / "same-name"
    same_name.mkdir()
    os.symlink(model_dir, same_name / "model")
    finish(start("model", tmp_path / "c", url, 3, after=0, cwd=same_name))
    refused = apostate("model", "--run-dir", str(tmp_path / "d"), *flags(url, 3), cwd=impostor.parent)
    what = "a worker whose model has the study's name and other weights"
    varies = r"(?<=\(KL )[\d.e+-]+(?= >)"  # a measured divergence: its last digits are the processor's
    line = bad_input.printed("workers", what, refused.returncode, refused.stdout, varies)
    assert "this worker's model answers other first tokens than study shared's base model" in line


def test_the_database_unreachable_or_lost_is_one_line_and_finished_trials_stay(
    postgres_server, model_dir, tmp_path, bad_input
):
    unreachable = make_url(postgres_server.url).set(port=1).render_as_string(hide_password=False)
    done = apostate(str(model_dir), "--run-dir", str(tmp_path / "a"), *flags(unreachable, 3))
    line = bad_input.printed("workers", "--storage: no database at that address", done.returncode, done.stdout)
    assert line.startswith("apostate: error: cannot reach the study's storage postgresql+psycopg://")
    assert ":***@" in line and make_url(unreachable).password not in done.stdout

    url = postgres_server.create_database("lost")
    worker = start(str(model_dir), tmp_path / "b", url, 40, after=5)
    wait_for_line(worker, "Trial   2:")
    postgres_server.cut_off("lost")
    try:
        printed, _ = worker.communicate(timeout=120)
    finally:
        postgres_server.reconnect("lost")
    # Which of the worker's queries meets the cut first (and so the server's words) varies.
    what, vary = "the database lost during a trial", r"(?<=/lost \().*?(?=\); )"
    line = bad_input.printed("workers", what, worker.returncode, printed, vary)
    assert "lost the connection to the study's storage" in line
    assert len(finished(trials(url))) >= 3
