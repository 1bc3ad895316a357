"""The Optuna study of a run: making or reopening it, the run folder's lock, resume, and the sampler.

By default the study lives in `<run_dir>/study.journal` (Optuna's JournalStorage), which every
finished trial is appended to at once, so Ctrl+C or a kill loses at most the trial in
flight; running the same command again resumes, and a larger n_trials adds trials.
With --storage it lives in a database that several workers share (workers/). Which of the two a
run has is chosen once (home.py); the trial loop itself is in trials.py.
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
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from apostate.errors import ApostateError
from apostate.nested import agrees_on, changed_keys
from apostate.progress import console

JOURNAL = "study.journal"
STUDY_NAME = "apostate"  # the journal's study (a shared study is named by --study-name)
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


def create_or_load(storage, name: str) -> optuna.Study:
    """The study `name` in `storage`: made now (two objectives, their names), or as stored."""
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
    return study


def fingerprint_changes(study: optuna.Study, fingerprint: dict, replaceable: bool) -> str | None:
    """The measured settings that differ from the study's (None: it may go on with these).

    `replaceable`: nothing was measured with the stored settings, so these take their place. A
    stored key that no setting of this method measures any more (directional's knobs in an ARA
    study made before they had their own table) changes nothing, so it is not compared.
    """
    stored = study.user_attrs.get("fingerprint")
    if stored is not None and agrees_on(stored, fingerprint):
        return None
    if stored is None or replaceable:
        study.set_user_attr("fingerprint", fingerprint)
        return None
    return ", ".join(changed_keys({k: v for k, v in stored.items() if k in fingerprint}, fingerprint))


def remember_seed(study: optuna.Study, seed: int | None) -> None:
    """The sampler's seed, kept in the study so that a resumed run draws from the same stream."""
    if "seed" not in study.user_attrs:
        study.set_user_attr("seed", seed if seed is not None else random.randrange(2**31))


def tpe_sampler(study: optuna.Study, n_startup_trials: int, worker: str | None = None) -> TPESampler:
    """TPE with a fresh stream per process: a resumed study does not replay its first trials'
    draws. `worker`: one of several sharing the study, which draw apart and count each other's
    running trials as if they had scored their worst (constant liar), so none proposes what
    another is trying."""
    seed = study.user_attrs["seed"] + len(study.trials)
    if worker is not None:
        seed += zlib.crc32(worker.encode())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # constant_liar
        return TPESampler(
            multivariate=True,
            n_startup_trials=n_startup_trials,
            n_ei_candidates=64,
            seed=seed % 2**32,
            constant_liar=worker is not None,
        )


def journal_storage(run_dir: Path) -> JournalStorage:
    return JournalStorage(JournalFileBackend(str(run_dir / JOURNAL)))


def worker_name() -> str:
    """This process, as other workers see it."""
    return f"{socket.gethostname()}:{os.getpid()}"


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


def fail_abandoned_trials(study: optuna.Study) -> None:
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
