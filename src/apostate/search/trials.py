"""The trial loop: each trial resets the model, applies the method's edit for the sampled
parameters, and scores it; finished trials go to the study (and its journal) at once."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import optuna
from optuna.trial import TrialState
from torch import nn

from apostate.capabilities.floor import CapabilityFloor
from apostate.methods.context import BrokenEdit
from apostate.methods.protocol import Method
from apostate.monitor import trim_free_memory
from apostate.progress import console, track
from apostate.scoring.scorer import Scorer, scores_line
from apostate.search.pareto import failures, fewest_failures_at
from apostate.search.study import FINISHED, finished
from apostate.search.trial_record import TrialRecord


@dataclass
class TrialRunner:
    """Runs one trial: reset, edit, score; records everything on the Optuna trial.

    The first objective is the share of harmful prompts not answered: refusals and broken
    responses together (breaking the model is no way to stop it refusing).

    A trial whose edit is broken (non-finite), whose KL exceeds `kl_cutoff`, or that falls below
    the capability `floor` (where the run has one) gets a positive Optuna constraint and is
    pruned: the sampler learns the region is infeasible, the Pareto front never shows it, and no
    made-up objective value is reported. Its refusals are not counted (that is the expensive
    part, and the model is unusable anyway).

    With `stop_dominated`, counting stops as soon as the trial has more failures than a scored
    trial with no higher KL: it can never be on the front (so never picked), and the rest of its
    responses would only say by how much it lost. It is pruned, feasible, with the counts of the
    responses finished by then (`dominated` says why).
    """

    method: Method
    scorer: Scorer
    model: nn.Module
    kl_cutoff: float
    floor: CapabilityFloor | None = None
    stop_dominated: bool = False

    def __call__(self, trial: optuna.Trial) -> tuple[float, float]:
        timings = {}
        start = time.perf_counter()
        self.method.reset()
        timings["reset"] = time.perf_counter() - start
        parameters = self.method.suggest(trial)
        TrialRecord.write(trial, parameters=self.method.describe(parameters))
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
        TrialRecord.write(trial, kl=kl)
        if not math.isfinite(kl) or kl > self.kl_cutoff:
            self._infeasible(trial, timings, start, f"KL {kl:.4g} above the cutoff {self.kl_cutoff}", kl)
        trial.set_constraint("kl_cutoff", kl - self.kl_cutoff)
        if self.floor is not None:
            self._check_floor(trial, timings, start, edited)
        mark = time.perf_counter()
        best = fewest_failures_at(trial.study, kl) if self.stop_dominated else None
        if best is None:
            counts = self.scorer.count(self.model, edited)
        else:
            counts = self.scorer.count(self.model, edited, enough_failures=failures(best) + 1)
        timings["refusals"] = time.perf_counter() - mark
        trim_free_memory()
        timings["total"] = time.perf_counter() - start
        TrialRecord.write(trial, refusals=counts.refusals, broken=counts.broken, total=counts.total, seconds=timings)
        if counts.total < self.scorer.harmful_count:
            self._dominated(trial, counts.failures, counts.total, best)
        return counts.failures / counts.total, kl

    def _dominated(self, trial: optuna.Trial, failed: int, finished: int, best: optuna.trial.FrozenTrial) -> None:
        record = TrialRecord.of(best)
        reason = (
            f"{failed} failures in its first {finished} of {self.scorer.harmful_count} responses; "
            f"trial {best.number} has {record.failures} at KL {record.kl:.4f}"
        )
        TrialRecord.write(trial, dominated=reason)
        raise optuna.TrialPruned(reason)  # feasible: its constraints were set before counting

    def _check_floor(self, trial: optuna.Trial, timings: dict, start: float, edited: set[int] | None) -> None:
        mark = time.perf_counter()
        accuracy = self.floor.scorer.accuracy(self.model, edited)
        timings["capability"] = time.perf_counter() - mark
        TrialRecord.write(trial, capability=accuracy)
        excess = self.floor.excess(accuracy)
        if excess > 0:
            reason = (
                f"accuracy {accuracy:.3f} below the floor ({self.floor.base_accuracy:.3f} less {self.floor.max_drop})"
            )
            self._infeasible(trial, timings, start, reason, excess, "capability_floor")
        trial.set_constraint("capability_floor", excess)

    def _infeasible(
        self, trial: optuna.Trial, timings: dict, start: float, reason: str, excess: float, key: str = "kl_cutoff"
    ) -> None:
        timings["total"] = time.perf_counter() - start
        TrialRecord.write(trial, seconds=timings, infeasible=reason)
        trial.set_constraint(key, excess if math.isfinite(excess) and excess > 0 else 1e9)
        if self.floor is not None and key == "kl_cutoff":
            trial.set_constraint("capability_floor", 0.0)  # not measured: every trial names both constraints
        raise optuna.TrialPruned(reason)


class SurplusTrial(Exception):
    """A worker of a shared study started a trial the study no longer needs (another worker
    started the last one at the same moment): it is failed unrun, marked `surplus`."""


Objective = Callable[[optuna.Trial], tuple[float, float]]


class TrialGate(Protocol):
    """When a trial may start, as the place the study lives says (search/home.py)."""

    where: str  # where finished trials are kept, for messages

    def objective(self, runner: Objective, n_trials: int) -> Objective: ...
    def may_start_trial(self, study: optuna.Study, n_trials: int) -> bool: ...
    def wait_for_others(self, study: optuna.Study, said: int) -> int: ...


def run_trials(
    study: optuna.Study,
    runner: TrialRunner,
    n_trials: int,
    after_trial: Callable[[optuna.Study], None],
    gate: TrialGate,
) -> bool:
    """Run trials until the study has `n_trials` finished ones (scored or infeasible).
    Returns False if interrupted.

    The `gate` says whether a trial may start now; where other workers run trials of the study
    too, a worker that may not waits for their running trials (failing stale ones, so that their
    retries are run): every worker returns when the study holds `n_trials` finished trials.
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

        objective = gate.objective(runner, n_trials)
        waiting = 0  # other workers' running trials, as last said
        try:
            while count_finished() < n_trials:
                if not gate.may_start_trial(study, n_trials):
                    waiting = gate.wait_for_others(study, waiting)
                    continue
                waiting = 0
                study.optimize(objective, n_trials=1, callbacks=[callback], catch=(SurplusTrial,))
        except KeyboardInterrupt:
            console.print(
                f"\n[yellow]Interrupted.[/] {len(finished(study))} finished trials are kept {gate.where}; "
                "run the same command again to resume."
            )
            return False
    return True


def _print_trial(trial: optuna.trial.FrozenTrial) -> None:
    record = TrialRecord.of(trial)
    if trial.state == TrialState.PRUNED and record.dominated:
        seconds = f"[dim]{record.seconds['total']:.1f} s[/]"
        console.print(f"  Trial {trial.number:>3}: KL {record.kl:.4f}, [dim]beaten: {record.dominated}[/]  {seconds}")
        return
    if trial.state == TrialState.PRUNED:
        console.print(f"  Trial {trial.number:>3}: [yellow]infeasible[/] ({record.infeasible})")
        return
    line = scores_line(record.refusals, record.total, record.kl, record.broken)
    console.print(f"  Trial {trial.number:>3}: {line}  [dim]{record.seconds['total']:.1f} s[/]")
