"""Where a run's study lives, chosen once per run (`study_home`): the journal in the run folder,
for one process (here), or a database that workers share (workers/shared_home.py).

Both answer the same questions (how the run folder is locked, how the study is opened or
resumed and its sampler set, when a trial may start, how the start-up is shared, what guards
the actions on the chosen trial, how a lost storage reads), so nothing else in a run asks which
one it has.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Protocol

import optuna

from apostate.errors import ApostateError
from apostate.progress import console
from apostate.search.reading import load_run_study
from apostate.search.study import (
    JOURNAL,
    STUDY_NAME,
    create_or_load,
    fail_abandoned_trials,
    fingerprint_changes,
    journal_storage,
    lock_run_dir,
    remember_seed,
    repair_journal,
    tpe_sampler,
)
from apostate.search.trials import Objective
from apostate.workers.shared_home import SharedHome


class StartupShare(Protocol):
    """The start-up measurements of a study: measured here, or shared with other workers."""

    startup: object | None  # the study's, fetched (None: this process measures them)

    def join(self, dtype: str) -> None: ...
    def check_base(self, own_logprobs: Callable[[], object]) -> None: ...
    def check_prepared(self, summary: dict) -> None: ...
    def publish(self, startup) -> None: ...
    def release(self) -> None: ...


class StudyHome(Protocol):
    where: str  # where finished trials are kept, for messages
    shares_exports: bool  # other processes may have exported the chosen trial already

    def lock(self): ...
    def announce(self) -> None: ...
    def read(self) -> optuna.Study: ...
    def open(self, fingerprint: dict, measured: bool, seed: int | None, n_startup_trials: int) -> optuna.Study: ...
    def startup_share(self, study: optuna.Study, identity: dict) -> StartupShare: ...
    def objective(self, runner: Objective, n_trials: int) -> Objective: ...
    def may_start_trial(self, study: optuna.Study, n_trials: int) -> bool: ...
    def wait_for_others(self, study: optuna.Study, said: int) -> int: ...
    def acting(self) -> contextlib.AbstractContextManager: ...
    def guard(self) -> contextlib.AbstractContextManager: ...


class UnsharedStartup:
    """A run with its own study: this process measures its start-up; there is nothing to fetch,
    check or publish."""

    startup = None

    def join(self, dtype: str) -> None:
        pass

    def check_base(self, own_logprobs) -> None:
        pass

    def check_prepared(self, summary: dict) -> None:
        pass

    def publish(self, startup) -> None:
        pass

    def release(self) -> None:
        pass


class RunFolderHome:
    """The study in `<run_dir>/study.journal`, for one process (the run folder is locked)."""

    where = "in the run folder"
    shares_exports = False

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def lock(self):
        return lock_run_dir(self.run_dir)

    def announce(self) -> None:
        console.print(f"Run folder: [bold]{self.run_dir}[/]")

    def read(self) -> optuna.Study:
        if not (self.run_dir / JOURNAL).is_file():
            raise ApostateError(f"run folder {self.run_dir} holds no study yet; run without --show-results first")
        return load_run_study(self.run_dir)

    def open(self, fingerprint: dict, measured: bool, seed: int | None, n_startup_trials: int) -> optuna.Study:
        """Create the study, or reopen it after checking it was made with the same settings. A
        study that holds no trial yet, in a run folder where nothing was `measured` yet (a run that
        failed before its start-up measurements), takes the new settings: nothing is lost."""
        repair_journal(self.run_dir / JOURNAL)
        study = create_or_load(journal_storage(self.run_dir), STUDY_NAME)
        changed = fingerprint_changes(study, fingerprint, replaceable=not study.trials and not measured)
        if changed is not None:
            raise ApostateError(
                f"run folder {self.run_dir} holds a study made with other settings (changed: {changed}); "
                "use the same settings to resume, or --run-dir for a new run"
            )
        remember_seed(study, seed)
        fail_abandoned_trials(study)
        study.sampler = tpe_sampler(study, n_startup_trials)
        return study

    def startup_share(self, study: optuna.Study, identity: dict) -> UnsharedStartup:
        return UnsharedStartup()

    def objective(self, runner: Objective, n_trials: int) -> Objective:
        return runner

    def may_start_trial(self, study: optuna.Study, n_trials: int) -> bool:
        return True  # the loop's own count is the study's: no one else adds trials

    def wait_for_others(self, study: optuna.Study, said: int) -> int:
        return said

    def acting(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        yield


def study_home(run_dir: Path, storage_url: str | None, study_name: str, heartbeat_seconds: int) -> StudyHome:
    """The run folder's journal, or (`storage_url`) the database study `study_name` workers share."""
    if storage_url is None:
        return RunFolderHome(run_dir)
    return SharedHome(run_dir, storage_url, study_name, heartbeat_seconds)
