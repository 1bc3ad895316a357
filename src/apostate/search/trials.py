"""The trial loop: each trial resets the model, applies the method's edit for the sampled
parameters, and scores it; finished trials go to the study (and its journal) at once."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState
from torch import nn

from ..methods import Method
from ..methods.context import BrokenEdit
from ..monitor import trim_free_memory
from ..progress import console, track
from ..scoring import Scorer, scores_line
from .study import FINISHED, finished, worker_name


@dataclass
class TrialRunner:
    """Runs one trial: reset, edit, score; records everything on the Optuna trial.

    The first objective is the share of harmful prompts not answered: refusals and broken
    responses together (breaking the model is no way to stop it refusing).

    A trial whose edit is broken (non-finite) or whose KL exceeds `kl_cutoff` gets a positive
    Optuna constraint and is pruned: the sampler learns the region is infeasible, the Pareto
    front never shows it, and no made-up objective value is reported. Its refusals are not
    counted (that is the expensive part, and the model is unusable anyway).
    """

    method: Method
    scorer: Scorer
    model: nn.Module
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
        edited = self.method.edited_layers()
        kl = self.scorer.kl(self.model, edited)
        timings["kl"] = time.perf_counter() - mark
        trial.set_user_attr("kl", kl)
        if not math.isfinite(kl) or kl > self.kl_cutoff:
            self._infeasible(trial, timings, start, f"KL {kl:.4g} above the cutoff {self.kl_cutoff}", kl)
        trial.set_constraint("kl_cutoff", kl - self.kl_cutoff)
        mark = time.perf_counter()
        counts = self.scorer.count(self.model, edited)
        timings["refusals"] = time.perf_counter() - mark
        trim_free_memory()
        timings["total"] = time.perf_counter() - start
        trial.set_user_attr("refusals", counts.refusals)
        trial.set_user_attr("broken", counts.broken)
        trial.set_user_attr("total", counts.total)
        trial.set_user_attr("seconds", timings)
        return counts.failures / counts.total, kl

    @staticmethod
    def _infeasible(trial: optuna.Trial, timings: dict, start: float, reason: str, excess: float) -> None:
        timings["total"] = time.perf_counter() - start
        trial.set_user_attr("seconds", timings)
        trial.set_user_attr("infeasible", reason)
        trial.set_constraint("kl_cutoff", excess if math.isfinite(excess) and excess > 0 else 1e9)
        raise optuna.TrialPruned(reason)


class SurplusTrial(Exception):
    """A worker of a shared study started a trial the study no longer needs (another worker
    started the last one at the same moment): it is failed unrun, marked `surplus`."""


def run_trials(
    study: optuna.Study,
    runner: TrialRunner,
    n_trials: int,
    after_trial: Callable[[optuna.Study], None],
    shared: bool = False,
    poll_seconds: float = 5.0,
) -> bool:
    """Run trials until the study has `n_trials` finished ones (scored or infeasible).
    Returns False if interrupted.

    `shared`: other workers run trials of the study too. A worker starts a trial only while the
    finished and running ones fall short of `n_trials` (or one waits to be run again), then
    waits for the others' running trials, failing stale ones (workers that died) so that their
    retries are run: every worker returns when the study holds `n_trials` finished trials.
    """
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
        counted = [done_before]

        def count_finished() -> int:
            now = len(finished(study))
            advance(max(0, min(now, n_trials) - counted[0]))
            counted[0] = max(counted[0], now)
            return now

        def callback(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if trial.state in FINISHED:
                _print_trial(trial)
                after_trial(study)
            count_finished()

        objective = _checked_for_surplus(runner, n_trials) if shared else runner
        waiting = 0  # other workers' running trials, as last said
        try:
            while count_finished() < n_trials:
                if shared and not _trial_to_start(study, n_trials):
                    waiting = _wait_for_others(study, poll_seconds, waiting)
                    continue
                waiting = 0
                study.optimize(objective, n_trials=1, callbacks=[callback], catch=(SurplusTrial,))
        except KeyboardInterrupt:
            where = "in the study's storage" if shared else "in the run folder"
            console.print(
                f"\n[yellow]Interrupted.[/] {len(finished(study))} finished trials are kept {where}; "
                "run the same command again to resume."
            )
            return False
    return True


def _checked_for_surplus(runner: TrialRunner, n_trials: int) -> Callable[[optuna.Trial], tuple[float, float]]:
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        counted = (TrialState.RUNNING, TrialState.WAITING, *FINISHED)
        before = [t for t in trial.study.get_trials(deepcopy=False, states=counted) if t.number < trial.number]
        if len(before) >= n_trials:
            trial.set_user_attr("surplus", True)
            raise SurplusTrial(f"the study had {n_trials} trials started before this one")
        trial.set_user_attr("worker", worker_name())
        return runner(trial)

    return objective


def _trial_to_start(study: optuna.Study, n_trials: int) -> bool:
    """Whether a trial waits to be run again, or the study needs more than are finished and running."""
    if study.get_trials(deepcopy=False, states=[TrialState.WAITING]):
        return True
    return len(study.get_trials(deepcopy=False, states=[TrialState.RUNNING, *FINISHED])) < n_trials


def _wait_for_others(study: optuna.Study, seconds: float, said: int) -> int:
    """Sleep while other workers run the study's last trials; say so when their number changes."""
    running = len(study.get_trials(deepcopy=False, states=[TrialState.RUNNING]))
    if running != said:
        console.print(f"  Waiting for {running} trials running in other workers...")
    time.sleep(seconds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a dead worker's trial, put back in the queue
    return running


def _print_trial(trial: optuna.trial.FrozenTrial) -> None:
    attrs = trial.user_attrs
    if trial.state == TrialState.PRUNED:
        console.print(f"  Trial {trial.number:>3}: [yellow]infeasible[/] ({attrs.get('infeasible')})")
        return
    line = scores_line(attrs["refusals"], attrs["total"], attrs["kl"], attrs.get("broken", 0))
    console.print(f"  Trial {trial.number:>3}: {line}  [dim]{attrs['seconds']['total']:.1f} s[/]")
