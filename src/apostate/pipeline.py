"""One run, stage by stage: resolve and load the model, find its writers, measure start-up
quantities, search, then show the Pareto front and act on the chosen trial."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import optuna

from .decoding import CpuKernels
from .decoding.kernel_timing import read_kernel_choices
from .errors import ApostateError
from .methods import Method, method_class
from .methods.ara.captures import capture_for_fitting
from .methods.context import MethodContext
from .model.adapter import Adapter, attach_adapter
from .model.architecture import Architecture, discover
from .model.loading import LoadedModel, check_model, load_tokenizer
from .model.sources import ModelSource, resolve_source
from .monitor import PhaseMonitor, median_trial_phases
from .progress import can_ask, console, warn
from .prompts import PromptSplits, Texts, load_prompt_splits
from .report import build_report
from .results import export, upload
from .scoring import Scorer, build_scorer
from .scoring.judges import Judge, build_judge
from .search.judged import judge_front
from .search.pareto import BaseScores, print_front, write_pareto
from .search.shared_startup import LocalStartup, SharedStartup, worker_identity
from .search.startup import CACHE_FILE, Startup, load_for_trials, prepare
from .search.startup_checks import check_prompts, fit_to_context, model_context
from .search.storage import JOURNAL, STORAGE_ERRORS, lost, shown, write_record
from .search.study import completed, finished, load_run_study, lock_actions, lock_run_dir, open_study
from .search.trials import TrialRunner, run_trials
from .settings import Settings


@dataclass
class Session:
    """Everything a run holds once its model is loaded and measured."""

    settings: Settings
    source: ModelSource
    run_dir: Path
    loaded: LoadedModel
    kernels: CpuKernels
    architecture: Architecture
    adapter: Adapter
    method: Method
    study: optuna.Study
    startup: Startup
    texts: Texts
    scorer: Scorer
    judge: Judge | None  # re-scores the front after the search (None: the markers' counts stand)

    @property
    def model(self):
        return self.adapter.model

    @property
    def base(self) -> BaseScores:
        return BaseScores(self.startup.base_refusals, self.scorer.harmful_count)

    def restore(self, trial: optuna.trial.FrozenTrial) -> None:
        """Put the model in the state of a finished trial (no reload: reset, then re-apply)."""
        self.method.reset()
        self.method.apply(self.method.suggest(optuna.trial.FixedTrial(trial.params)))

    def close(self) -> None:
        """Keep the kernel choices made since start-up; undo what was swapped into the model for
        speed (routed Linear layers)."""
        with contextlib.suppress(OSError):  # a full disk here must not hide the error that ends the run
            self.kernels.timer.write(self.run_dir / KERNELS_FILE)
        self.kernels.restore()


KERNELS_FILE = "kernels.json"  # the run's CPU kernel choices (decoding/kernel_timing.py)


def run_dir_for(settings: Settings, source: ModelSource) -> Path:
    """--run-dir, else runs/<model>, or runs/<model>-<study name> for a worker of a shared study."""
    if settings.run_dir:
        return settings.run_dir
    return Path("runs") / (f"{source.run_name}-{settings.study_name}" if settings.storage else source.run_name)


def run(settings: Settings) -> int:
    """The whole job; returns the exit code."""
    source = resolve_source(settings.model, settings.model_revision, settings.cache_path())
    if not settings.show_results:  # which loads no model
        settings = check_model(source, settings, can_ask(settings.headless))
    run_dir = run_dir_for(settings, source)
    lock = lock_run_dir(run_dir, shared=settings.storage is not None)
    session = None
    try:
        if settings.evaluate_model:
            from .results.actions import evaluate_other_model

            return evaluate_other_model(settings, source)
        study = _open_run_study(settings, source, run_dir)
        if settings.show_results:
            return show_stored_results(study, run_dir, source.name)
        _check_before_loading(settings, study)
        monitor = PhaseMonitor()
        session = start_session(settings, source, run_dir, monitor, study)
        return _search_and_act(session, monitor)
    except STORAGE_ERRORS as error:  # the database of a shared study, lost after it was reached
        if settings.storage is None:
            raise
        raise ApostateError(lost(settings.storage.get_secret_value(), error)) from None
    finally:
        if session is not None:
            session.close()
        lock.close()


def _open_run_study(settings: Settings, source: ModelSource, run_dir: Path) -> optuna.Study:
    console.print(f"Run folder: [bold]{run_dir}[/]")
    url = settings.storage.get_secret_value() if settings.storage else None
    if url is not None:
        console.print(f"Study: [bold]{settings.study_name}[/] in {shown(url)}")
        write_record(run_dir, url, settings.study_name)  # for `apostate report` of this folder
        if settings.show_results:  # reading only: any worker's settings
            return load_run_study(run_dir, url, settings.study_name)
    elif settings.show_results and not (run_dir / JOURNAL).is_file():
        raise ApostateError(f"run folder {run_dir} holds no study yet; run without --show-results first")
    fingerprint = settings.measurement_fingerprint(source.name)
    measured = (run_dir / CACHE_FILE).is_file()
    return open_study(settings, run_dir, fingerprint, measured)


def _check_before_loading(settings: Settings, study: optuna.Study) -> None:
    """Refuse what would fail only after the model is loaded: an output path that is a file, a
    --trial that is not (and will not become) a finished trial of this run, a headless upload
    without a repository name or a token."""
    if settings.output_dir is not None:
        export.check_output_dir(settings.output_dir)
    upload.check_before_loading(settings)
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
    runner = TrialRunner(session.method, session.scorer, session.model, settings.kl_cutoff)
    shared = settings.storage is not None
    with monitor.phase("trials"):
        args = (session.study, runner, settings.n_trials, lambda study: _save_front(session), shared)
        done = run_trials(*args, poll_seconds=min(5, settings.heartbeat_seconds))
    if not completed(session.study):
        console.print("No finished trials yet.")
        return 0 if done else 130
    if done and session.judge is not None:
        with monitor.phase("judge the front"):
            judge_front(session, session.judge)
    show_results(session)
    if done:
        from .results.actions import act

        chosen = ", ".join(settings.actions or ["none"]) if settings.headless else "interactive"
        # Workers sharing this run folder act one after another (a finished export is not redone).
        with (
            monitor.phase(f"chosen trial: {chosen}"),
            lock_actions(session.run_dir) if shared else contextlib.nullcontext(),
        ):
            act(session)
        _save_front(session)  # with the held-out scores an evaluation added
    _report_phases(session, monitor)
    write_report(session.run_dir, session.study)
    return 0 if done else 130


def start_session(
    settings: Settings, source: ModelSource, run_dir: Path, monitor: PhaseMonitor, study: optuna.Study | None = None
) -> Session:
    """Load the model and measure what its trials need; `study`: the run folder's, opened already."""
    study = study or _open_run_study(settings, source, run_dir)
    prompts: PromptSplits = load_prompt_splits(settings)
    share = LocalStartup()
    if settings.storage is not None:
        share = SharedStartup(study, worker_identity(settings, source, prompts), settings.heartbeat_seconds)
    judge = None
    if settings.judge.kind != "markers":
        with monitor.phase("load and check the judge"):
            judge = build_judge(settings, run_dir)  # before the model: a judge that cannot work stops the run now
    with monitor.phase("load model"):
        tokenizer = load_tokenizer(source, settings)
        check_prompts(tokenizer, settings, prompts)  # a template that cannot work stops the run before the load
        editable = load_editable(source, settings, run_dir, tokenizer)
    tokenizer, kernels, loaded, architecture, adapter = editable
    prompts = fit_to_context(tokenizer, settings, prompts, model_context(loaded.model))
    key = {
        "fingerprint": settings.measurement_fingerprint(source.name),
        "dtype": str(loaded.dtype),
        "batch_size": settings.batch_size,
    }
    device = loaded.device
    try:
        with monitor.phase("start-up measurements"):
            share.join(str(loaded.dtype))  # a shared study's, or this worker measures them
            startup = share.startup or prepare(
                adapter.model, tokenizer, device, kernels, settings, prompts, run_dir, key
            )
            for message in share.startup.warnings if share.startup else ():  # the measuring worker's findings
                warn(message)
            share.publish(startup)  # if measured here: the other workers go on
        kernels.timer.write(run_dir / KERNELS_FILE)  # a resumed run computes its trials the same way
        texts = Texts(tokenizer, settings, prompts, startup.response_prefix)
        scorer = build_scorer(tokenizer, device, kernels, settings, startup.batch_size, texts)
        scorer.resume_from_base(startup.base_logprobs, startup.base_responses)
        share.check_base(lambda: scorer.harmless.first_token_logprobs(adapter.model))
        args = (editable, settings, startup.directions, texts, startup.batch_size, monitor)
        method = build_method(*args, on_captures=share.check_captures)
    finally:
        share.release()
    for name, value in (("base_refusals", startup.base_refusals), ("model", source.name), ("method", settings.method)):
        study.set_user_attr(name, value)  # for reports made from the study alone
    parts = (loaded, kernels, architecture, adapter, method, study, startup, texts, scorer, judge)
    return Session(settings, source, run_dir, *parts)


class Editable(NamedTuple):
    """A loaded model with the LoRA slots its methods write into."""

    tokenizer: object
    kernels: CpuKernels
    loaded: LoadedModel
    architecture: Architecture
    adapter: Adapter


def load_editable(source: ModelSource, settings: Settings, run_dir: Path, tokenizer=None) -> Editable:
    """Tokenizer (unless given) and model (with the run's CPU kernel choices), its residual
    writers, and the adapter."""
    console.print(f"Loading model [bold]{source.name}[/]...")
    tokenizer = tokenizer or load_tokenizer(source, settings)
    kernels = CpuKernels(read_kernel_choices(run_dir / KERNELS_FILE))
    loaded = load_for_trials(source, settings, tokenizer, kernels)
    architecture = discover(loaded.model)
    _report_architecture(architecture, settings.components)
    adapter = attach_adapter(loaded.model, architecture, method_class(settings.method).adapter_rank(settings))
    return Editable(tokenizer, kernels, loaded, architecture, adapter)


def build_method(
    editable: Editable,
    settings: Settings,
    directions,
    texts: Texts,
    batch_size: int,
    monitor: PhaseMonitor,
    on_captures: Callable[[dict], None] | None = None,
) -> Method:
    """The run's method over the editable model, with what it is fitted to (captures, for ARA,
    which `on_captures` sees first)."""
    method_type = method_class(settings.method)
    architecture, adapter = editable.architecture, editable.adapter
    components = [c for c in settings.components if c in architecture.components()]
    context = MethodContext(adapter, settings, architecture.n_layers, components, directions)
    if method_type.needs_captures:
        with monitor.phase("capture module activations"):
            device = editable.loaded.device
            context.captures = capture_for_fitting(adapter, editable.tokenizer, device, settings, texts, batch_size)
        if on_captures is not None:
            on_captures(context.captures)
    return method_type(context)


def _report_architecture(architecture: Architecture, wanted: list[str]) -> None:
    console.print(f"* {architecture.n_layers} layers, hidden size {architecture.hidden_size}")
    for component in architecture.components():
        counts = sorted({architecture.count(layer, component) for layer in range(architecture.n_layers)})
        per_layer = "/".join(map(str, counts))
        state = "" if component in wanted else " [dim](not ablated: not in components)[/]"
        console.print(f"* {component}: {per_layer} residual writers per layer{state}")
    for entry in architecture.unsupported:
        console.print(f"[yellow]* not ablated, unknown kind of residual writer:[/] {entry}")


def _report_phases(session: Session, monitor: PhaseMonitor) -> None:
    """Print time and peak memory per phase; keep them in the run folder as phases.json."""
    import json

    monitor.close()
    trial_seconds = [t.user_attrs["seconds"] for t in completed(session.study) if "seconds" in t.user_attrs]
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
