"""The throwaway PostgreSQL server (tests/postgres_server.py) and what Optuna does with it: one
study shared by several worker processes, and a worker killed mid-trial whose trial the heartbeat
fails and RetryHeartbeatStaleTrialCallback runs again (the Optuna >= 4.9 name of
RetryFailedTrialCallback, deprecated and removed in 6.0). No model: the objective is x². Fails
(never skips) when PostgreSQL or psycopg is missing: .ci/run installs both."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import optuna
import pytest
import sqlalchemy
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState
from postgres_server import PostgresServer, require_driver

pytestmark = pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")

HEARTBEAT_INTERVAL = 1
GRACE_PERIOD = 2

# One Optuna worker: loads the study, runs trials of x² until the study holds N complete trials.
# argv: url, study name, N, seconds per trial, tag, and optionally: a trial count after which it
# writes argv[7] (a marker file) and hangs in its next trial until killed. $WORKER_BARRIER: see below.
WORKER = """
import os, pathlib, sys, time, warnings
import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState

warnings.simplefilter("ignore")
optuna.logging.set_verbosity(optuna.logging.WARNING)
url, name, n, seconds, tag = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
hang_after = int(sys.argv[6]) if len(sys.argv) > 6 else None
storage = RDBStorage(
    url, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD,
    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
)
study = optuna.load_study(study_name=name, storage=storage)
done = 0
barrier = os.environ.get("WORKER_BARRIER")  # a folder: say ready, then wait for "go" (workers start together)
if barrier:
    pathlib.Path(barrier, tag).touch()
    deadline = time.monotonic() + 60
    while not pathlib.Path(barrier, "go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)

def objective(trial):
    global done
    x = trial.suggest_float("x", -1, 1)
    trial.set_user_attr("worker", tag)
    if hang_after is not None and done == hang_after:
        pathlib.Path(sys.argv[7] + ".tmp").write_text(str(trial.number))
        os.replace(sys.argv[7] + ".tmp", sys.argv[7])  # whole, never seen empty
        time.sleep(600)  # killed here
    time.sleep(seconds)
    done += 1
    return x * x

study.optimize(objective, n_trials=10 * n, callbacks=[MaxTrialsCallback(n, states=(TrialState.COMPLETE,))])
""".replace("HEARTBEAT_INTERVAL", str(HEARTBEAT_INTERVAL)).replace("GRACE_PERIOD", str(GRACE_PERIOD))


@pytest.fixture(scope="module")
def server():
    require_driver()
    with PostgresServer() as running:
        yield running


def worker(url: str, study: str, n: int, seconds: float, tag: str, *hang: str, barrier=None) -> subprocess.Popen:
    env = {**os.environ, "WORKER_BARRIER": str(barrier)} if barrier else None
    return subprocess.Popen(
        [sys.executable, "-c", WORKER, url, study, str(n), str(seconds), tag, *hang],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )  # fmt: skip


def wait_for(condition, processes, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        for process in processes:
            assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def finish(process: subprocess.Popen, timeout: float = 60) -> None:
    output, _ = process.communicate(timeout=timeout)
    assert process.returncode == 0, output


def new_study(url: str, name: str) -> optuna.Study:
    storage = RDBStorage(url, heartbeat_interval=HEARTBEAT_INTERVAL, grace_period=GRACE_PERIOD)
    return optuna.create_study(study_name=name, storage=storage, direction="minimize")


def test_server_listens_on_localhost_with_a_password(server):
    assert server.url.startswith(f"postgresql+psycopg://{server.user}:{server.password}@127.0.0.1:{server.port}/")
    engine = sqlalchemy.create_engine(server.url)
    with engine.connect() as connection:
        assert connection.execute(sqlalchemy.text("SHOW listen_addresses")).scalar() == "127.0.0.1"
        assert connection.execute(sqlalchemy.text("SELECT current_user")).scalar() == server.user
    engine.dispose()
    wrong = sqlalchemy.create_engine(server.url.replace(server.password, "wrong-password"))
    with pytest.raises(sqlalchemy.exc.OperationalError, match="password authentication failed"):
        wrong.connect()
    wrong.dispose()


def test_two_processes_share_one_study(server, tmp_path):
    url, n = server.create_database(), 8
    new_study(url, "shared")
    workers = [worker(url, "shared", n, 0.2, tag, barrier=tmp_path) for tag in ("a", "b")]
    wait_for(lambda: (tmp_path / "a").exists() and (tmp_path / "b").exists(), workers, "both workers to load the study")
    (tmp_path / "go").touch()
    for process in workers:
        finish(process)

    trials = optuna.load_study(study_name="shared", storage=url).get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # MaxTrialsCallback runs after a trial ends and stops only its own process: the other worker may
    # be inside a trial (or starting one) then, so N workers can overshoot by up to N - 1 trials.
    assert n <= len(complete) <= n + 1
    assert all(t.state == TrialState.COMPLETE for t in trials)
    assert sorted(t.number for t in trials) == list(range(len(trials)))  # unique, no gaps
    assert {t.user_attrs["worker"] for t in complete} == {"a", "b"}


def test_killed_worker_trial_fails_and_is_retried(server, tmp_path):
    url, n = server.create_database(), 6
    study = new_study(url, "killed")
    marker = tmp_path / "hanging"
    victim = worker(url, "killed", n, 0.1, "victim", "1", str(marker))  # completes one trial, hangs in the next
    try:
        wait_for(marker.exists, [victim], "the worker's hanging trial")
        hanging = int(marker.read_text())
        # By now its heartbeat thread has recorded a beat (a trial killed before its first beat never goes stale).
        time.sleep(HEARTBEAT_INTERVAL + 0.5)
    finally:
        victim.kill()  # SIGKILL: no cleanup, the trial stays RUNNING
        victim.communicate()
    assert study.trials[hanging].state == TrialState.RUNNING

    # The survivor checks for stale trials before each trial: its 5 trials of 0.6 s span > GRACE_PERIOD,
    # so it sees the victim's trial go stale, fails it, and runs the enqueued retry, however fast it is.
    finish(worker(url, "killed", n, 0.6, "survivor"))

    trials = optuna.load_study(study_name="killed", storage=url).get_trials(deepcopy=False)
    by_state = {state: [t for t in trials if t.state == state] for state in TrialState}
    assert len(by_state[TrialState.COMPLETE]) == n  # one worker left: no overshoot
    assert [t.number for t in by_state[TrialState.FAIL]] == [hanging]
    assert not by_state[TrialState.RUNNING] and not by_state[TrialState.WAITING]
    retried = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == hanging]
    assert len(retried) == 1 and retried[0].state == TrialState.COMPLETE
    assert retried[0].params == trials[hanging].params
    assert retried[0].user_attrs["worker"] == "survivor"
    assert sorted(t.number for t in trials) == list(range(len(trials)))


def test_missing_postgres_is_an_error_naming_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PG_BINDIR", str(tmp_path))  # a folder without the server programs
    with pytest.raises(RuntimeError, match="apt-get install -y postgresql"):
        with PostgresServer():
            pass
