"""The Optuna study of a run: its storage, the run folder's lock, resume, and the sampler.

By default the study lives in `<run_dir>/study.journal` (Optuna's JournalStorage), which every
finished trial is appended to at once, so Ctrl+C or a kill loses at most the trial in
flight; running the same command again resumes, and a larger n_trials adds trials.
With --storage it lives in a database that several workers share (storage.py).
The trial loop itself is in trials.py.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import socket
import time
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import optuna
from optuna.samplers import TPESampler
from optuna.storages import JournalStorage
from optuna.trial import TrialState

from ..errors import ApostateError
from ..progress import console
from .storage import (
    JOURNAL,
    STORAGE_ERRORS,
    STUDY_NAME,
    journal_storage,
    open_database,
    open_for_reading,
    study_location,
    unreachable,
)

METRIC_NAMES = ["refused share", "KL divergence"]
SET_TRIAL_STATE = 6  # the journal's op code for a trial's final state (Optuna's JournalOperation, not public)

# ERROR: Optuna logs a trial ended by Ctrl+C as a warning with its traceback; the trial loop says it in one line.
optuna.logging.set_verbosity(optuna.logging.ERROR)


def lock_run_dir(run_dir: Path, shared: bool = False):
    """Lock the run folder for this process's lifetime: alone (a journal run), or `shared` with
    other workers of the same shared study on this machine."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = (run_dir / ".lock").open("w")
    except OSError as error:
        raise ApostateError(run_dir_problem(run_dir, error)) from error
    try:
        fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ApostateError(f"run folder {run_dir} is in use by another apostate process") from None
    return handle


def run_dir_problem(run_dir: Path, error: OSError) -> str:
    """Why the run folder cannot be made or written, in one line with what to do."""
    blocker = next((p for p in (run_dir, *run_dir.parents) if p.exists() and not p.is_dir()), None)
    if blocker == run_dir:
        return f"run folder {run_dir} is a file; give a folder path with --run-dir"
    if blocker is not None:
        return f"cannot create run folder {run_dir}: {blocker} is a file, not a folder; choose another --run-dir"
    reasons = {
        errno.EACCES: "permission denied",
        errno.EPERM: "permission denied",
        errno.EROFS: "the file system there is read-only",
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is used up",
    }
    reason = reasons.get(error.errno)
    if reason is None:  # /proc, /sys and other file systems that hold no ordinary folders say ENOENT or EINVAL
        reason = f"the file system there does not take new folders ({error.strerror or error})"
    return f"cannot create run folder {run_dir}: {reason}; choose a writable --run-dir"


@contextmanager
def lock_actions(run_dir: Path):
    """While held, no other worker sharing the run folder acts on a chosen trial (exports, say)."""
    with (run_dir / ".actions.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def open_study(settings, run_dir: Path, fingerprint: dict, measured: bool = False) -> optuna.Study:
    """Create the run's study, or reopen it after checking it was made with the same settings.

    Journal (no --storage): a study that holds no trial yet, in a run folder where nothing was
    `measured` yet (a run that failed before its start-up measurements), takes the new settings:
    nothing is lost. A shared study (--storage) takes its settings from the worker that measures
    its start-up (search/shared_startup.py); here a worker whose settings differ is refused early.
    """
    url = settings.storage.get_secret_value() if settings.storage else None
    if url is None:
        repair_journal(run_dir / JOURNAL)
        storage, name = journal_storage(run_dir), STUDY_NAME
    else:
        storage, name = open_database(url, settings.heartbeat_seconds), settings.study_name
    try:
        study = optuna.create_study(
            study_name=name,
            storage=storage,
            directions=["minimize", "minimize"],  # refusal rate, KL divergence
            load_if_exists=True,
        )
        if study.metric_names is None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                study.set_metric_names(METRIC_NAMES)  # for optuna-dashboard
        _check_fingerprint(study, fingerprint, url is None and not study.trials and not measured, run_dir)
        if "seed" not in study.user_attrs:
            study.set_user_attr("seed", settings.seed if settings.seed is not None else random.randrange(2**31))
        if url is None:
            _fail_abandoned_trials(study)
        else:
            optuna.storages.fail_stale_trials(study)  # those of workers that died while none was running
    except STORAGE_ERRORS as error:
        raise ApostateError(unreachable(url, error)) from None
    study.sampler = _sampler(study, settings.n_startup_trials, shared=url is not None)
    return study


def _check_fingerprint(study: optuna.Study, fingerprint: dict, replaceable: bool, run_dir: Path) -> None:
    stored = study.user_attrs.get("fingerprint")
    if stored == fingerprint:
        return
    if stored is None or replaceable:  # replaceable: nothing was measured with the old settings
        study.set_user_attr("fingerprint", fingerprint)
        return
    changed = ", ".join(sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k)))
    if isinstance(study._storage, JournalStorage):
        raise ApostateError(
            f"run folder {run_dir} holds a study made with other settings (changed: {changed}); "
            "use the same settings to resume, or --run-dir for a new run"
        )
    raise ApostateError(
        f"study {study.study_name} was made with other settings (changed: {changed}); "
        "give this worker the study's settings, or another --study-name"
    )


def _sampler(study: optuna.Study, n_startup_trials: int, shared: bool) -> TPESampler:
    """TPE with a fresh stream per process: a resumed study does not replay its first trials'
    draws, and workers of a shared study draw apart. Workers also count each other's running
    trials as if they had scored their worst (constant liar), so none proposes what another
    is trying."""
    seed = study.user_attrs["seed"] + len(study.trials)
    if shared:
        seed += zlib.crc32(worker_name().encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constant_liar
        return TPESampler(
            multivariate=True,
            n_startup_trials=n_startup_trials,
            n_ei_candidates=64,
            seed=seed % 2**32,
            constant_liar=shared,
        )


def worker_name() -> str:
    """This process, as other workers see it."""
    return f"{socket.gethostname()}:{os.getpid()}"


def load_run_study(run_dir: Path, url: str | None = None, study_name: str | None = None) -> optuna.Study:
    """A run folder's study as stored, for reading (no settings check, no sampler)."""
    url, name = study_location(run_dir, url, study_name)
    storage = journal_storage(run_dir) if url is None else open_for_reading(url)
    try:
        return optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        raise ApostateError(f"the storage named by {run_dir} holds no study {name}") from None
    except STORAGE_ERRORS as error:  # only a database's
        raise ApostateError(unreachable(url, error)) from None


def repair_journal(journal: Path) -> None:
    """Set aside a half-written last record (a kill during a write), so that new records are not
    appended onto it; every complete record before it, so every finished trial, is kept.

    A broken record before the last cannot come from an interrupted append: that is an error.
    """
    if not journal.is_file():
        return
    data = journal.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # `tail` is empty when the file ends with a newline
    if not tail and complete and not _is_record(complete[-1]):
        complete, tail = complete[:-1], complete[-1]
    for number, line in enumerate(complete, start=1):
        if not _is_record(line):
            raise ApostateError(
                f"{journal} has a damaged record at line {number} (not at its end, so not an interrupted write); "
                "restore the file from a backup, or use --run-dir for a new run"
            )
    if not tail:
        return
    aside = journal.with_name(f"{journal.name}.torn-{int(time.time())}")
    aside.write_bytes(tail)
    with journal.open("r+b") as handle:
        handle.truncate(sum(len(line) + 1 for line in complete))
    finished = sum(_is_finished_trial(line) for line in complete)
    console.print(
        f"[yellow]{journal.name} ended in a half-written record (the run was killed while writing it); "
        f"set it aside as {aside.name}. {finished} finished trials recovered.[/]"
    )


def _is_record(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _is_finished_trial(line: bytes) -> bool:
    record = json.loads(line)
    finished_states = {TrialState.COMPLETE.value, TrialState.PRUNED.value}
    return record.get("op_code") == SET_TRIAL_STATE and record.get("state") in finished_states


def _fail_abandoned_trials(study: optuna.Study) -> None:
    """Trials left RUNNING by a killed process never finish; mark them failed (the run folder is locked)."""
    for trial in study.get_trials(deepcopy=False, states=[TrialState.RUNNING]):
        study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)


FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Scored trials (the ones that can be on the Pareto front)."""
    return study.get_trials(deepcopy=False, states=[TrialState.COMPLETE])


def finished(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Trials that count toward n_trials: scored ones and infeasible (pruned) ones."""
    return study.get_trials(deepcopy=False, states=FINISHED)
