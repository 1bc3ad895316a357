"""A session: what every command opens before it works, in one place.

`open_source` names and checks the model, `open_model` loads it once (tokenizer, the run's CPU
kernel choices, and for an edit its residual writers and adapter), `build_method` builds the
run's method on it, and `start_session` makes the whole `Session` a run searches with: the
study, the start-up measurements, the scorer and the judge. Commands import this module; no
stage does.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import optuna

from apostate.capabilities.floor import CapabilityFloor
from apostate.capabilities.harness import data_folder
from apostate.decoding import CpuKernels
from apostate.decoding.kernel_timing import read_kernel_choices
from apostate.errors import ApostateError
from apostate.methods.context import MethodContext, RunInputs
from apostate.methods.protocol import Method, method_class, restore
from apostate.model.adapter import Adapter, attach_adapter
from apostate.model.architecture import Architecture, discover
from apostate.model.loading import LoadedModel, check_model, load_model, load_tokenizer
from apostate.model.sources import ModelSource, resolve_source
from apostate.monitor import PhaseMonitor
from apostate.progress import can_ask, console, warn
from apostate.prompts import PromptSplits, Texts, load_prompt_splits
from apostate.scoring.judges.model import ModelJudge
from apostate.scoring.judges.refined import Judge, build_judge
from apostate.scoring.scorer import Scorer, build_scorer
from apostate.search.home import StudyHome, study_home
from apostate.search.pareto import BaseScores
from apostate.settings import Settings
from apostate.startup.checks import check_prompts, fit_to_context, model_context
from apostate.startup.measure import CACHE_FILE, Startup, prepare, scoring_options
from apostate.workers.shared_startup import worker_identity

KERNELS_FILE = "kernels.json"  # the run's CPU kernel choices (decoding/kernel_timing.py)


@dataclass
class OpenedModel:
    """A loaded model; for an edit, with its residual writers and the LoRA slots methods write into."""

    tokenizer: object
    kernels: CpuKernels
    loaded: LoadedModel
    architecture: Architecture | None = None
    adapter: Adapter | None = None


@dataclass
class Session:
    """Everything a run holds once its model is loaded and measured."""

    settings: Settings
    source: ModelSource
    run_dir: Path
    home: StudyHome
    opened: OpenedModel
    method: Method
    study: optuna.Study
    startup: Startup
    texts: Texts
    scorer: Scorer
    judge: Judge | None  # re-scores the front after the search (None: the markers' counts stand)
    floor: CapabilityFloor | None = None  # the capability every trial must keep (None: no floor)

    @property
    def model(self):
        return self.opened.adapter.model

    @property
    def loaded(self) -> LoadedModel:
        return self.opened.loaded

    @property
    def base(self) -> BaseScores:
        return BaseScores(self.startup.base_refusals, self.scorer.harmful_count)

    def restore(self, trial: optuna.trial.FrozenTrial) -> None:
        """Put the model in the state of a finished trial (no reload: reset, then re-apply)."""
        restore(self.method, trial.params)

    def close(self) -> None:
        """Keep the kernel choices made since start-up; undo what was swapped into the model for
        speed (routed Linear layers)."""
        kernels = self.opened.kernels
        with contextlib.suppress(OSError):  # a full disk here must not hide the error that ends the run
            kernels.timer.write(self.run_dir / KERNELS_FILE)
        kernels.restore()


def run_dir_for(settings: Settings, source: ModelSource) -> Path:
    """--run-dir, else runs/<model>, or runs/<model>-<study name> for a worker of a shared study."""
    if settings.run_dir:
        return settings.run_dir
    return Path("runs") / (f"{source.run_name}-{settings.study_name}" if settings.storage else source.run_name)


def home_for(settings: Settings, run_dir: Path) -> StudyHome:
    """Where this run's study lives: chosen here, once."""
    url = settings.storage.get_secret_value() if settings.storage else None
    return study_home(run_dir, url, settings.study_name, settings.heartbeat_seconds)


def open_source(
    name: str, revision: str | None, settings: Settings, check: bool = True, interactive: bool | None = None
) -> tuple[ModelSource, Settings]:
    """The model `name` resolved (hub, folder, GGUF, demo) and, with `check`, its settings fitted to
    it (dtypes, quantization), asking where asking is allowed (`interactive`, else by the settings)."""
    source = resolve_source(name, revision, settings.cache_path())
    if check:
        ask = can_ask(settings.headless) if interactive is None else interactive
        settings = check_model(source, settings, ask)
    return source, settings


def open_model(
    source: ModelSource,
    settings: Settings,
    run_dir: Path | None,
    tokenizer=None,
    kernels: CpuKernels | None = None,
    edit: bool = True,
) -> OpenedModel:
    """Tokenizer (unless given) and model, with the CPU kernels timed fastest here (the run
    folder's choices; `kernels.restore` takes the routing back); with `edit`, its residual
    writers and the adapter the run's method writes into. Custom (remote) model code gets no
    kernels: it may assume contiguous weights and its own forward methods."""
    console.print(f"Loading model [bold]{source.name}[/]...")
    tokenizer = tokenizer or load_tokenizer(source, settings)
    if kernels is None:
        kernels = CpuKernels(read_kernel_choices(run_dir / KERNELS_FILE) if run_dir is not None else None)
    loaded = load_model(source, settings, tokenizer)
    if not settings.trust_remote_code:
        chosen = kernels.apply(loaded.model)
        if chosen:
            console.print(chosen)
    opened = OpenedModel(tokenizer, kernels, loaded)
    if edit:
        opened.architecture = discover(loaded.model)
        _report_architecture(opened.architecture, settings.components)
        rank = method_class(settings.method).adapter_rank(settings.method_settings())
        opened.adapter = attach_adapter(loaded.model, opened.architecture, rank)
    return opened


def build_method(
    opened: OpenedModel,
    settings: Settings,
    directions,
    texts: Texts,
    batch_size: int,
    monitor: PhaseMonitor,
    on_prepared: Callable[[dict], None] | None = None,
    recorded: dict | None = None,
) -> Method:
    """The run's method over the opened model, with what it prepares once (`on_prepared` sees
    its summary first: a shared study's workers compare theirs; `recorded`: what its pass
    observers saw of the start-up's residual pass)."""
    method_type = method_class(settings.method)
    architecture, adapter = opened.architecture, opened.adapter
    components = [c for c in settings.components if c in architecture.components()]
    own = settings.method_settings()
    context = MethodContext(adapter, own, architecture.n_layers, components, directions, opened.loaded.quantized)
    if method_type.preparation is not None:
        with monitor.phase(method_type.preparation):
            device, keep_on = opened.loaded.device, _activations_home(settings, opened)
            inputs = RunInputs(adapter, opened.tokenizer, device, texts, batch_size, own, keep_on, recorded or {})
            context.prepared = method_type.prepare(inputs)
        if on_prepared is not None:
            on_prepared(method_type.prepared_summary(context.prepared))
    return method_type(context)


def _activations_home(settings: Settings, opened: OpenedModel):
    """Where activations a run keeps live: the CPU, or the model's device (settings.activations_on)."""
    return "cpu" if settings.activations_on == "cpu" else opened.loaded.device


def open_judge(settings: Settings, run_dir: Path | None) -> Judge | None:
    """The configured re-scoring judge, checked; None for `markers` (the search's counts stand)."""
    return build_judge(settings.judge, settings.refusal_markers, run_dir, lambda: _open_model_judge(settings))


def _open_model_judge(settings: Settings) -> ModelJudge:
    name = settings.judge.model
    if not name:
        raise ApostateError("judge.kind 'model' needs a judge model: set --judge.model (hub id, folder, .gguf or demo)")
    plain = {"model": name, "model_revision": None, "chat_template": None, "quantization": "none"}
    source, judge_settings = open_source(name, None, settings.model_copy(update=plain))
    try:
        tokenizer = load_tokenizer(source, judge_settings)
    except ApostateError as error:
        if "no chat template" in str(error):
            raise ApostateError(
                f"judge model '{source.name}' has no chat template, so it cannot read the rubric; "
                "pick a chat (instruct) model as judge"
            ) from error
        raise ApostateError(f"judge model: {error}") from error
    console.print(f"Loading judge model [bold]{source.name}[/]...")
    loaded = load_model(source, judge_settings, tokenizer)
    return ModelJudge(loaded.model, tokenizer, source.name, settings.judge.batch_size)


def open_study(settings: Settings, source: ModelSource, run_dir: Path, home: StudyHome) -> optuna.Study:
    """The run's study, made or resumed with these settings."""
    home.announce()
    if settings.show_results:
        return home.read()  # reading only: any settings
    fingerprint = settings.measurement_fingerprint(source.name)
    measured = (run_dir / CACHE_FILE).is_file()
    return home.open(fingerprint, measured, settings.seed, settings.n_startup_trials)


def start_session(
    settings: Settings,
    source: ModelSource,
    run_dir: Path,
    monitor: PhaseMonitor,
    study: optuna.Study | None = None,
    home: StudyHome | None = None,
) -> Session:
    """Load the model and measure what its trials need; `study`: the run folder's, opened already."""
    home = home or home_for(settings, run_dir)
    study = study or open_study(settings, source, run_dir, home)
    prompts: PromptSplits = load_prompt_splits(settings)
    share = home.startup_share(study, worker_identity(settings, source, prompts))
    judge = None
    if settings.judge.kind != "markers":
        with monitor.phase("load and check the judge"):
            judge = open_judge(settings, run_dir)  # before the model: a judge that cannot work stops the run now
    with monitor.phase("load model"):
        tokenizer = load_tokenizer(source, settings)
        check_prompts(tokenizer, settings, prompts)  # a template that cannot work stops the run before the load
        opened = open_model(source, settings, run_dir, tokenizer)
    prompts = fit_to_context(tokenizer, settings, prompts, model_context(opened.loaded.model))
    method_type, keep_on = method_class(settings.method), _activations_home(settings, opened)
    observers = method_type.pass_observers(opened.adapter, settings.method_settings(), keep_on)
    try:
        startup = _measure_startup(opened, settings, source, prompts, run_dir, monitor, share, observers)
        texts = Texts(tokenizer, settings, prompts, startup.response_prefix)
        scorer = build_scorer(
            tokenizer, opened.loaded.device, opened.kernels, scoring_options(settings), startup.batch_size, texts
        )
        base = opened.adapter.model  # no edit yet
        scorer.resume_from_base(startup.base_logprobs, startup.base_responses, startup.base_harmless_answers, base)
        share.check_base(lambda: scorer.harmless.first_token_logprobs(opened.adapter.model))
        floor = _capability_floor(settings, opened, startup.batch_size)
        args = (opened, settings, startup.directions, texts, startup.batch_size, monitor)
        method = build_method(*args, on_prepared=share.check_prepared, recorded=observers)
    finally:
        share.release()
    for name, value in (("base_refusals", startup.base_refusals), ("model", source.name), ("method", settings.method)):
        study.set_user_attr(name, value)  # for reports made from the study alone
    if floor is not None:
        study.set_user_attr("capability_floor_base", floor.base_accuracy)
    return Session(settings, source, run_dir, home, opened, method, study, startup, texts, scorer, judge, floor)


def _capability_floor(settings: Settings, opened: OpenedModel, batch_size: int) -> CapabilityFloor | None:
    """The run's capability floor, measured on the model before any edit (None: the run has none)."""
    if not settings.capability_floor.items:
        return None
    folder = data_folder(settings.capabilities)
    model, device = opened.adapter.model, opened.loaded.device
    return CapabilityFloor.measure(model, opened.tokenizer, settings.capability_floor, folder, batch_size, device)


def _measure_startup(opened, settings, source, prompts, run_dir, monitor, share, observers) -> Startup:
    """The study's start-up quantities: a shared study's, or measured here (and published), with
    the method's `observers` on the residual pass."""
    key = {
        "fingerprint": settings.measurement_fingerprint(source.name),
        "dtype": str(opened.loaded.dtype),
        "batch_size": settings.batch_size,
    }
    with monitor.phase("start-up measurements"):
        share.join(str(opened.loaded.dtype))  # a shared study's, or this worker measures them
        startup = share.startup or prepare(
            opened.adapter.model,
            opened.tokenizer,
            opened.loaded.device,
            opened.kernels,
            settings,
            prompts,
            run_dir,
            key,
            observers,
        )
        for message in share.startup.warnings if share.startup else ():  # the measuring worker's findings
            warn(message)
        share.publish(startup)  # if measured here: the other workers go on
    opened.kernels.timer.write(run_dir / KERNELS_FILE)  # a resumed run computes its trials the same way
    return startup


def _report_architecture(architecture: Architecture, wanted: list[str]) -> None:
    console.print(f"* {architecture.n_layers} layers, hidden size {architecture.hidden_size}")
    for component in architecture.components():
        counts = sorted({architecture.count(layer, component) for layer in range(architecture.n_layers)})
        per_layer = "/".join(map(str, counts))
        state = "" if component in wanted else " [dim](not ablated: not in components)[/]"
        console.print(f"* {component}: {per_layer} residual writers per layer{state}")
    for entry in architecture.unsupported:
        console.print(f"[yellow]* not ablated, unknown kind of residual writer:[/] {entry}")
