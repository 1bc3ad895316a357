"""The Optuna study of a run: local journal storage, the run folder's lock, and resume.

The study lives in `<run_dir>/study.journal` (Optuna's JournalStorage), which every
finished trial is appended to at once, so Ctrl+C or a kill loses at most the trial in
flight; running the same command again resumes, and a larger n_trials adds trials.
The trial loop itself is in trials.py.
"""

from __future__ import annotations

import fcntl
import json
import random
import time
from pathlib import Path

import optuna
from optuna.samplers import TPESampler
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from ..errors import ApostateError
from ..progress import console

STUDY_NAME = "apostate"
JOURNAL = "study.journal"
SET_TRIAL_STATE = 6  # the journal's op code for a trial's final state (Optuna's JournalOperation, not public)

# ERROR: Optuna logs a trial ended by Ctrl+C as a warning with its traceback; the trial loop says it in one line.
optuna.logging.set_verbosity(optuna.logging.ERROR)


def lock_run_dir(run_dir: Path):
    """Hold an exclusive lock on the run folder for this process's lifetime."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / ".lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ApostateError(f"run folder {run_dir} is in use by another apostate process") from None
    return handle


def open_study(
    run_dir: Path, fingerprint: dict, seed: int | None, n_startup_trials: int, measured: bool = False
) -> optuna.Study:
    """Create the study, or reopen it after checking it was made with the same settings.

    A study that holds no trial yet, in a run folder where nothing was `measured` yet (a run
    that failed before its start-up measurements), takes the new settings: nothing is lost.
    """
    repair_journal(run_dir / JOURNAL)
    storage = JournalStorage(JournalFileBackend(str(run_dir / JOURNAL)))
    study = optuna.create_study(
        study_name=STUDY_NAME,
        storage=storage,
        directions=["minimize", "minimize"],  # refusal rate, KL divergence
        load_if_exists=True,
    )
    stored = study.user_attrs.get("fingerprint")
    if stored is None:
        study.set_user_attr("fingerprint", fingerprint)
        study.set_user_attr("seed", seed if seed is not None else random.randrange(2**31))
    elif stored != fingerprint and not study.trials and not measured:
        study.set_user_attr("fingerprint", fingerprint)  # nothing was measured with the old settings
    elif stored != fingerprint:
        changed = ", ".join(sorted(k for k in set(stored) | set(fingerprint) if stored.get(k) != fingerprint.get(k)))
        raise ApostateError(
            f"run folder {run_dir} holds a study made with other settings (changed: {changed}); "
            "use the same settings to resume, or --run-dir for a new run"
        )
    _fail_abandoned_trials(study)
    base_seed = study.user_attrs["seed"]
    # A resumed study gets a fresh stream, so it does not replay the first trials' random draws.
    study.sampler = TPESampler(
        multivariate=True,
        n_startup_trials=n_startup_trials,
        n_ei_candidates=64,
        seed=base_seed + len(study.trials),
    )
    return study


def load_run_study(run_dir: Path) -> optuna.Study:
    """A run folder's study as stored, for reading (no settings check, no sampler)."""
    storage = JournalStorage(JournalFileBackend(str(run_dir / JOURNAL)))
    return optuna.load_study(study_name=STUDY_NAME, storage=storage)


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
