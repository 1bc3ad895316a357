"""`apostate MODEL [flags]` (cli.py reads the settings): one run, stage by stage. Open the model and measure its start-up
(session.py), search, then show the Pareto front and act on the chosen trial (actions.py)."""

from __future__ import annotations

import json
from pathlib import Path

import optuna

from apostate.capabilities import harness
from apostate.commands.actions import act
from apostate.commands.evaluate import evaluate_other_model
from apostate.commands.judged import judge_front
from apostate.errors import ApostateError
from apostate.methods.protocol import method_class
from apostate.model.sources import ModelSource
from apostate.monitor import PhaseMonitor, median_trial_phases
from apostate.progress import console
from apostate.report import build_report
from apostate.results import export, upload
from apostate.search.pareto import BaseScores, print_front, write_pareto
from apostate.search.study import completed, finished
from apostate.search.trial_record import TrialRecord
from apostate.search.trials import TrialRunner, run_trials
from apostate.session import Session, home_for, open_source, open_study, run_dir_for, start_session
from apostate.settings import Settings


def run(settings: Settings) -> int:
    """The whole job; returns the exit code."""
    # --show-results loads no model, so its settings need no check against one.
    source, settings = open_source(settings.model, settings.model_revision, settings, check=not settings.show_results)
    run_dir = run_dir_for(settings, source)
    home = home_for(settings, run_dir)
    lock = home.lock()
    session = None
    try:
        with home.guard():  # a shared study's database, lost after it was reached: one line
            if settings.evaluate_model:
                return evaluate_other_model(settings, source)
            study = open_study(settings, source, run_dir, home)
            if settings.show_results:
                return show_stored_results(study, run_dir, source.name)
            _check_before_loading(settings, study, source)
            monitor = PhaseMonitor()
            session = start_session(settings, source, run_dir, monitor, study, home)
            return _search_and_act(session, monitor)
    finally:
        if session is not None:
            session.close()
        lock.close()


def _check_before_loading(settings: Settings, study: optuna.Study, source: ModelSource) -> None:
    """Refuse what would fail only after the model is loaded: an output path that is a file, a
    --trial that is not (and will not become) a finished trial of this run, a headless upload
    without a repository name or a token, a GGUF export of a model that did not come in as GGUF,
    an evaluation or a capability floor without the benchmarks' harness."""
    if settings.output_dir is not None:
        export.check_output_dir(settings.output_dir)
    uploads_gguf = "upload" in settings.actions and settings.upload.export == "gguf"
    if settings.headless and ("save-gguf" in settings.actions or uploads_gguf):
        export.check_gguf_source(source)
    if settings.headless and "evaluate" in settings.actions:
        harness.check_available(settings.capabilities)
    if settings.capability_floor.items:
        floor = settings.capability_floor
        harness.check_available(settings.capabilities.model_copy(update={"tasks": floor.tasks}))
    if settings.headless and "upload" in settings.actions:
        edits_in_adapter = method_class(settings.method).edits_in_adapter
        upload.check_before_loading(settings.upload, settings.method, edits_in_adapter)
    if settings.trial is None or settings.trial in {t.number for t in completed(study)}:
        return
    if len(finished(study)) >= settings.n_trials:  # no trial left to run that could become it
        numbers = ", ".join(str(t.number) for t in completed(study)) or "none"
        raise ApostateError(
            f"trial {settings.trial} is not a finished trial of this run (finished: {numbers}); "
            "pick one of them, or raise --n-trials"
        )


def show_stored_results(study: optuna.Study, run_dir: Path, model_name: str) -> int:
    """--show-results: the front from the run folder's journal; no model is loaded, nothing is run."""
    scored = completed(study)
    if not scored:
        console.print("No finished trials yet.")
        return 0
    base = BaseScores(study.user_attrs.get("base_refusals", 0), scored[0].user_attrs["total"])
    _write_front(study, run_dir, base, model_name)
    write_report(run_dir, study)
    return 0


def _search_and_act(session: Session, monitor: PhaseMonitor) -> int:
    settings = session.settings
    runner = TrialRunner(
        session.method, session.scorer, session.model, settings.kl_cutoff, session.floor, settings.stop_dominated_trials
    )
    with monitor.phase("trials"):
        done = run_trials(session.study, runner, settings.n_trials, lambda study: _save_front(session), session.home)
    if not completed(session.study):
        console.print("No finished trials yet.")
        return 0 if done else 130
    if done and session.judge is not None:
        with monitor.phase("judge the front"):
            judge_front(session)
    show_results(session)
    if done:
        # Workers sharing this run folder act one after another (a finished export is not redone).
        with session.home.acting():
            act(session, monitor.phase)
        _save_front(session)  # with the held-out scores an evaluation added
    _report_phases(session, monitor)
    write_report(session.run_dir, session.study)
    return 0 if done else 130


def _report_phases(session: Session, monitor: PhaseMonitor) -> None:
    """Print time and peak memory per phase; keep them in the run folder as phases.json."""
    monitor.close()
    trial_seconds = [seconds for t in completed(session.study) if (seconds := TrialRecord.of(t).seconds)]
    monitor.show(trial_seconds)
    startup_seconds = {name: round(value, 2) for name, value in session.startup.seconds.items()}
    console.print(
        "Start-up measurements: " + ", ".join(f"{name} {value:.1f} s" for name, value in startup_seconds.items())
    )
    records = [vars(record) for record in monitor.records]
    data = {"phases": records, "startup_seconds": startup_seconds, "trial_medians": median_trial_phases(trial_seconds)}
    (session.run_dir / "phases.json").write_text(json.dumps(data, indent=2))


def _save_front(session: Session) -> None:
    write_pareto(session.study, session.run_dir, session.base, session.source.name)


def show_results(session: Session) -> None:
    _write_front(session.study, session.run_dir, session.base, session.source.name)


def _write_front(study: optuna.Study, run_dir: Path, base: BaseScores, model_name: str) -> None:
    write_pareto(study, run_dir, base, model_name)
    print_front(study, base)
    console.print(f"Pareto front saved to {run_dir / 'pareto.json'}")


def write_report(run_dir: Path, study: optuna.Study | None = None) -> None:
    path = build_report(run_dir, study)
    console.print(f"Report: [bold]{path}[/] (pictures beside it)")
