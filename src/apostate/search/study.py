"""The Optuna study of a run: local journal storage, the run folder's lock, and resume.

The study lives in `<run_dir>/study.journal` (Optuna's JournalStorage), which every
finished trial is appended to at once, so Ctrl+C or a kill loses at most the trial in
flight; running the same command again resumes, and a larger n_trials adds trials.
The trial loop itself is in trials.py.
"""

from __future__ import annotations

import fcntl
import random
from pathlib import Path

import optuna
from optuna.samplers import TPESampler
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from ..errors import ApostateError

STUDY_NAME = "apostate"
JOURNAL = "study.journal"

optuna.logging.set_verbosity(optuna.logging.WARNING)


def lock_run_dir(run_dir: Path):
    """Hold an exclusive lock on the run folder for this process's lifetime."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handle = (run_dir / ".lock").open("w")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ApostateError(f"run folder {run_dir} is in use by another apostate process") from None
    return handle


def open_study(run_dir: Path, fingerprint: dict, seed: int | None, n_startup_trials: int) -> optuna.Study:
    """Create the study, or reopen it after checking it was made with the same settings."""
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
