"""The Optuna study of a run: local journal storage, resume, and the trial loop.

The study lives in `<run_dir>/study.journal` (Optuna's JournalStorage), which every
finished trial is appended to at once, so Ctrl+C or a kill loses at most the trial in
flight; running the same command again resumes, and a larger n_trials adds trials.
"""

from __future__ import annotations

import fcntl
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.samplers import TPESampler
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from ..decoding.layer_replay import unchanged_layers
from ..errors import ApostateError
from ..methods.context import BrokenEdit
from ..monitor import trim_free_memory
from ..progress import console, track

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


@dataclass
class TrialRunner:
    """Runs one trial: reset, edit, score; records everything on the Optuna trial.

    A trial whose edit is broken (non-finite) or whose KL exceeds `kl_cutoff` gets a positive
    Optuna constraint and is pruned: the sampler learns the region is infeasible, the Pareto
    front never shows it, and no made-up objective value is reported. Its refusals are not
    counted (that is the expensive part, and the model is unusable anyway).
    """

    method: object
    scorer: object
    model: object
    kl_cutoff: float

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        timings = {}
        start = time.perf_counter()
        self.method.reset()
        timings["reset"] = time.perf_counter() - start
        parameters = self.method.suggest(trial)
        trial.set_user_attr("parameters", self.method.describe(parameters))
        mark = time.perf_counter()
        try:
            self.method.apply(parameters)
        except BrokenEdit as error:
            self._infeasible(trial, timings, start, str(error), float("inf"))
        timings["edit"] = time.perf_counter() - mark
        mark = time.perf_counter()
        unchanged = unchanged_layers(self.method.edited_layers())
        kl = self.scorer.kl(self.model, unchanged)
        timings["kl"] = time.perf_counter() - mark
        trial.set_user_attr("kl", kl)
        if not math.isfinite(kl) or kl > self.kl_cutoff:
            self._infeasible(trial, timings, start, f"KL {kl:.4g} above the cutoff {self.kl_cutoff}", kl)
        trial.set_constraint("kl_cutoff", kl - self.kl_cutoff)
        mark = time.perf_counter()
        refusals = self.scorer.count_refusals(self.model, unchanged)
        timings["refusals"] = time.perf_counter() - mark
        trim_free_memory()
        timings["total"] = time.perf_counter() - start
        total = len(self.scorer.harmful_texts)
        trial.set_user_attr("refusals", refusals)
        trial.set_user_attr("total", total)
        trial.set_user_attr("seconds", timings)
        return refusals / total, kl

    @staticmethod
    def _infeasible(trial: optuna.Trial, timings: dict, start: float, reason: str, excess: float) -> None:
        timings["total"] = time.perf_counter() - start
        trial.set_user_attr("seconds", timings)
        trial.set_user_attr("infeasible", reason)
        trial.set_constraint("kl_cutoff", excess if math.isfinite(excess) and excess > 0 else 1e9)
        raise optuna.TrialPruned(reason)


def run_trials(
    study: optuna.Study, runner: TrialRunner, n_trials: int, after_trial: Callable[[optuna.Study], None]
) -> bool:
    """Run trials until the study has `n_trials` finished ones (scored or infeasible).
    Returns False if interrupted."""
    remaining = n_trials - len(finished(study))
    if remaining <= 0:
        return True
    done_before = len(finished(study))
    console.print(
        f"\n[bold]Running {remaining} trials[/] ({done_before} already done, resuming)"
        if done_before
        else f"\n[bold]Running {remaining} trials[/]"
    )
    with track("trials", remaining) as advance:

        def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if trial.state in FINISHED:
                _print_trial(trial)
                after_trial(study)
                advance(1)

        try:
            while len(finished(study)) < n_trials:
                study.optimize(runner, n_trials=1, callbacks=[callback], catch=())
        except KeyboardInterrupt:
            console.print(
                f"\n[yellow]Interrupted.[/] {len(finished(study))} finished trials are kept in the run "
                "folder; run the same command again to resume."
            )
            return False
    return True


def _print_trial(trial: optuna.trial.FrozenTrial) -> None:
    attrs = trial.user_attrs
    if trial.state == TrialState.PRUNED:
        console.print(f"  Trial {trial.number:>3}: [yellow]infeasible[/] ({attrs.get('infeasible')})")
        return
    console.print(
        f"  Trial {trial.number:>3}: refusals {attrs['refusals']:>3}/{attrs['total']} "
        f"({attrs['refusals'] / attrs['total']:6.1%}), KL {attrs['kl']:.4f}  "
        f"[dim]{attrs['seconds']['total']:.1f} s[/]"
    )


def fingerprint_of(settings, model_name: str) -> dict:
    """The settings that define what a study measures; a resumed study must match them."""
    keys = [
        "method",
        "components",
        "orthogonalize_direction",
        "winsorization_quantile",
        "row_normalization",
        "full_normalization_rank",
        "system_prompt",
        "max_response_tokens",
        "refusal_markers",
        "response_prefix",
        "quantization",
        "chat_template",
        "kl_cutoff",
    ]
    data = {key: getattr(settings, key) for key in keys}
    data["model"] = model_name
    data["harmless"] = settings.harmless.model_dump()
    data["harmful"] = settings.harmful.model_dump()
    data["search"] = settings.search.model_dump()
    if settings.method != "directional":
        data["ara"] = settings.ara.model_dump()
    return json.loads(json.dumps(data, default=str))
