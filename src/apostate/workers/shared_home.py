"""A study in a database that several workers share (--storage): the run folder is locked
shared, the study is opened with heartbeats and a per-worker sampler stream, a trial starts only
while the study still needs one, the start-up is measured by one worker and fetched by the others
(shared_startup.py), and the actions on the chosen trial take turns (search/home.py has the
run-folder counterpart)."""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import optuna
from optuna.trial import TrialState

from apostate.errors import ApostateError
from apostate.progress import console
from apostate.search.reading import load_run_study
from apostate.search.study import (
    FINISHED,
    create_or_load,
    fingerprint_changes,
    lock_actions,
    lock_run_dir,
    remember_seed,
    tpe_sampler,
    worker_name,
)
from apostate.search.trial_record import TrialRecord
from apostate.search.trials import Objective, SurplusTrial
from apostate.workers.shared_startup import SharedStartup
from apostate.workers.storage import (
    STORAGE_ERRORS,
    lost_message,
    masked_url,
    open_database,
    unreachable_message,
    write_record,
)


class SharedHome:
    """The study `study_name` at `url`, run by every worker given the same name."""

    where = "in the study's storage"
    shares_exports = True

    def __init__(self, run_dir: Path, url: str, study_name: str, heartbeat_seconds: int):
        self.run_dir = run_dir
        self.url = url
        self.study_name = study_name
        self.heartbeat_seconds = heartbeat_seconds

    def lock(self):
        return lock_run_dir(self.run_dir, shared=True)  # other workers of this study on this machine may share it

    def announce(self) -> None:
        console.print(f"Run folder: [bold]{self.run_dir}[/]")
        console.print(f"Study: [bold]{self.study_name}[/] in {masked_url(self.url)}")
        write_record(self.run_dir, self.url, self.study_name)  # for `apostate report` of this folder

    def read(self) -> optuna.Study:
        return load_run_study(self.run_dir, self.url, self.study_name)

    def open(self, fingerprint: dict, measured: bool, seed: int | None, n_startup_trials: int) -> optuna.Study:
        """Join or make the study. It takes its settings from the worker that measures its start-up
        (shared_startup.py); here a worker whose settings differ is refused early."""
        try:
            study = create_or_load(open_database(self.url, self.heartbeat_seconds), self.study_name)
            changed = fingerprint_changes(study, fingerprint, replaceable=False)
            if changed is not None:
                raise ApostateError(
                    f"study {self.study_name} was made with other settings (changed: {changed}); "
                    "give this worker the study's settings, or another --study-name"
                )
            remember_seed(study, seed)
            optuna.storages.fail_stale_trials(study)  # those of workers that died while none was running
        except STORAGE_ERRORS as error:
            raise ApostateError(unreachable_message(self.url, error)) from error
        study.sampler = tpe_sampler(study, n_startup_trials, worker=worker_name())
        return study

    def startup_share(self, study: optuna.Study, identity: dict) -> SharedStartup:
        return SharedStartup(study, identity, self.heartbeat_seconds)

    def objective(self, runner: Objective, n_trials: int) -> Objective:
        """`runner`, unless the study had `n_trials` started before this trial (another worker
        started the last one at the same moment): then the trial is failed unrun, marked `surplus`."""

        def objective(trial: optuna.Trial) -> tuple[float, float]:
            counted = (TrialState.RUNNING, TrialState.WAITING, *FINISHED)
            before = [t for t in trial.study.get_trials(deepcopy=False, states=counted) if t.number < trial.number]
            if len(before) >= n_trials:
                TrialRecord.write(trial, surplus=True)
                raise SurplusTrial(f"the study had {n_trials} trials started before this one")
            TrialRecord.write(trial, worker=worker_name())
            return runner(trial)

        return objective

    def may_start_trial(self, study: optuna.Study, n_trials: int) -> bool:
        """Whether a trial waits to be run again, or the study needs more than are finished and running."""
        if study.get_trials(deepcopy=False, states=[TrialState.WAITING]):
            return True
        return len(study.get_trials(deepcopy=False, states=[TrialState.RUNNING, *FINISHED])) < n_trials

    def wait_for_others(self, study: optuna.Study, said: int) -> int:
        """Sleep while other workers run the study's last trials; say so when their number changes.
        Stale trials (of workers that died) are failed, so that their retries are run."""
        running = len(study.get_trials(deepcopy=False, states=[TrialState.RUNNING]))
        if running != said:
            console.print(f"  Waiting for {running} trials running in other workers...")
        time.sleep(min(5, self.heartbeat_seconds))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # a dead worker's trial, put back in the queue
        return running

    def acting(self) -> contextlib.AbstractContextManager:
        return lock_actions(self.run_dir)  # workers sharing this run folder act one after another

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """The database lost after it was reached: one line, the finished trials kept there."""
        try:
            yield
        except STORAGE_ERRORS as error:
            raise ApostateError(lost_message(self.url, error)) from error
