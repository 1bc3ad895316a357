"""After the search: pick a trial (interactively or by rule) and act on it."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import NamedTuple

import optuna

from apostate.commands.capabilities import benchmark_trial
from apostate.commands.chosen import record_chosen
from apostate.commands.evaluate import evaluate_heldout
from apostate.commands.gguf import save_gguf_export
from apostate.commands.judged import judge_front
from apostate.errors import ApostateError
from apostate.progress import can_ask, console
from apostate.results import upload
from apostate.results.chat import chat
from apostate.results.export import TrialSummary, save_adapter, save_merged
from apostate.results.record import FORMAT, machine, package_versions, prompt_hashes, tensor_hash
from apostate.scoring.scorer import scores_line
from apostate.scoring.verdicts import VerdictCounts
from apostate.search.pareto import count_text, failures, judged_counts, pareto_trials, trial_record
from apostate.search.study import completed
from apostate.search.trial_record import TrialRecord
from apostate.session import Session


def pick_trial(session: Session) -> optuna.trial.FrozenTrial:
    """--trial N, else (headless) the fewest failures (refusals and broken responses; the judge's
    counts where it re-scored the front) among Pareto trials with KL <= pick_max_kl."""
    settings = session.settings
    if settings.trial is not None:
        by_number = {t.number: t for t in completed(session.study)}
        if settings.trial not in by_number:
            raise ApostateError(f"trial {settings.trial} is not a finished trial of this run")
        return by_number[settings.trial]
    front = pareto_trials(session.study)
    within = [t for t in front if TrialRecord.of(t).kl <= settings.pick_max_kl]
    if not within:
        console.print(f"[yellow]No Pareto trial has KL <= {settings.pick_max_kl}; taking the lowest-KL one.[/]")
        return min(front, key=lambda t: TrialRecord.of(t).kl)
    return min(within, key=lambda t: (_judged_failures(session.study, t), TrialRecord.of(t).kl))


def _judged_failures(study, trial) -> int:
    """What a user would not get done: the judge's full-length refusals, evasions and broken answers
    where it re-scored the trial, else the search's count."""
    counts = judged_counts(study, trial.number)
    return VerdictCounts.from_dict(counts).failures if counts else failures(trial)


def act(session: Session, phase: Callable[[str], AbstractContextManager] = lambda name: nullcontext()) -> None:
    """Headless: pick a trial and run the actions, each in a `phase` of its own (time and memory
    per action in the run's phase table); else the menu."""
    if session.settings.headless:
        trial = pick_trial(session)
        if session.judge is not None:
            judge_front(session, extra=[trial])
        _announce(session.study, trial)
        with phase("chosen trial: report samples"):
            record_chosen(session, trial)  # leaves the model in the trial's state
        for action in sorted(session.settings.actions, key=_action_order):
            with phase(f"chosen trial: {action}"):
                perform(session, trial, action)
        return
    with phase("chosen trial: interactive"):
        _interactive(session)


def _action_order(action: str) -> int:
    """Headless actions run in the order given, but an evaluation goes first, so that a saved model's
    card carries its held-out scores, and an upload last, so that it publishes what the saves wrote."""
    return (action != "evaluate") + (action == "upload")


def _interactive(session: Session) -> None:
    import questionary

    while True:
        front = pareto_trials(session.study)
        choices = [
            questionary.Choice(f"Trial {t.number:>3}: {_trial_scores(session.study, t)}", value=t) for t in front
        ]
        trial = questionary.select("Which trial?", choices=choices + [questionary.Choice("Quit", value=None)]).ask()
        if trial is None:
            return
        record_chosen(session, trial)  # leaves the model in the trial's state
        while True:
            options = [questionary.Choice(action.label, value=key) for key, action in ACTIONS.items()]
            options += [questionary.Choice("Pick another trial", value="back"), questionary.Choice("Quit", value=None)]
            action = questionary.select(f"Trial {trial.number}: what now?", choices=options).ask()
            if action is None:
                return
            if action == "back":
                break
            try:
                perform(session, trial, action)
            except ApostateError as error:
                console.print(f"[red]error:[/] {error}")


def _trial_scores(study, trial) -> str:
    attrs = TrialRecord.of(trial)
    line = scores_line(attrs.refusals, attrs.total, attrs.kl, attrs.broken)
    judged = judged_counts(study, trial.number)
    return f"{line} (judged: {count_text(judged)})" if judged else line


def _announce(study, trial) -> None:
    console.print(f"Using trial [bold]{trial.number}[/]: {_trial_scores(study, trial)}")


def perform(session: Session, trial, action: str) -> None:
    ACTIONS[action].run(session, trial, action)


def _chat(session: Session, trial, action: str) -> None:
    chat(session.model, session.loaded.tokenizer, session.settings.system_prompt, session.loaded.device)


def _evaluate(session: Session, trial, action: str) -> None:
    evaluate_heldout(session, trial)
    benchmark_trial(session, trial)


def _save(session: Session, trial, action: str) -> None:
    """`save` (merged), `save-adapter` or `save-gguf` into the export folder; kept where another
    worker of a shared study already saved this trial's export there."""
    settings = session.settings
    output = _export_folder(session, action)
    summary = _summary(session, trial)
    if session.home.shares_exports and upload.holds_export(output, _export_identity(summary)):
        console.print(f"{output} already holds trial {trial.number}'s export (another worker saved it); kept")
        return
    tokenizer = session.loaded.tokenizer
    if action == "save-gguf":
        path = save_gguf_export(session, trial, summary, output)
    elif action == "save":
        args = (output, settings.max_shard_size, summary, settings.trust_remote_code)
        path = save_merged(session.source, session.method.deltas(), tokenizer, *args)
    else:
        if not session.method.edits_in_adapter:
            raise ApostateError(
                f"method '{settings.method}' edits full weights (any rank), which a LoRA adapter cannot hold; "
                "save the merged model, or use method 'ara-lora'"
            )
        path = save_adapter(session.source, session.opened.adapter, tokenizer, output, summary)
    console.print(f"Saved to [bold]{path}[/]")


EXPORT_FOLDERS = {"save": "model", "save-adapter": "adapter", "save-gguf": "gguf"}


def _export_folder(session: Session, action: str) -> Path:
    """Where a save action writes: --output-dir, else <run_dir>/model, adapter or gguf."""
    return session.settings.output_dir or session.run_dir / EXPORT_FOLDERS[action]


def _upload(session: Session, trial, action: str) -> None:
    """Publish the trial's export on the hub; saved first unless its folder already holds it."""
    settings = session.settings
    ask = can_ask(settings.headless)
    chosen = upload.destination(settings.upload, ask)
    if chosen is None:
        console.print("Upload cancelled.")
        return
    token = upload.upload_token(ask)
    save = {folder: action for action, folder in EXPORT_FOLDERS.items()}[settings.upload.export]
    folder = _export_folder(session, save)
    summary = _summary(session, trial)  # what a save would write now (held-out scores included)
    if not upload.holds_export(folder, _export_identity(summary)):
        perform(session, trial, save)
    url = upload.publish(folder, *chosen, token)
    console.print(f"Uploaded {folder} to [bold]{url}[/]")


def _export_identity(summary: TrialSummary) -> dict:
    """What an export folder's apostate.json says when it holds this trial's export as it would be saved now."""
    expected = {"method": summary.method, "trial": summary.trial_number}
    return expected | {"optuna_parameters": summary.raw_parameters, "scores": summary.scores}


def _summary(session: Session, trial) -> TrialSummary:
    record = trial_record(trial, judged_counts(session.study, trial.number))
    evaluation = {key: record[key] for key in ("refusals", "broken", "total", "kl")}
    evaluation["base_refusals"] = session.startup.base_refusals
    if "judged" in record:
        evaluation["judged"] = record["judged"]
        evaluation["base_judged"] = judged_counts(session.study, "base")
    scores = {"evaluation": evaluation}
    heldout = TrialRecord.of(trial).heldout or session.study.user_attrs.get(f"heldout_{trial.number}")
    if heldout:
        scores["held-out"] = heldout
    return TrialSummary(
        method=session.settings.method,
        trial_number=trial.number,
        raw_parameters=dict(trial.params),
        parameters=record["parameters"],
        scores=scores,
        settings=session.settings.model_dump(mode="json", exclude={"config", "storage"}),
        recipe=recipe(session, trial),
        capabilities=session.study.user_attrs.get(f"capabilities_{trial.number}") or {},
    )


def recipe(session: Session, trial) -> dict:
    """What rebuilds `trial` of `session` without searching (the weight hashes come at export)."""
    settings = session.settings
    loaded = session.loaded
    return {
        "format": FORMAT,
        "versions": package_versions(),
        "machine": machine(loaded.device, loaded.dtype, loaded.quantized),
        "model": settings.model,
        "settings": settings.model_dump(mode="json", exclude={"config", "storage"}),
        "method": settings.method,
        "trial": trial.number,
        "parameters": dict(trial.params),
        "startup": {"batch_size": session.startup.batch_size, "response_prefix": session.startup.response_prefix},
        "prompts_sha256": prompt_hashes(session.texts.prompts),
        "directions_sha256": tensor_hash(session.startup.directions),
    }


class Action(NamedTuple):
    label: str  # as the interactive menu lists it
    run: Callable[[Session, object, str], None]  # (session, trial, the action's name)


ACTIONS = {
    "save": Action("Save the merged model", _save),
    "save-adapter": Action("Save the LoRA adapter only", _save),
    "save-gguf": Action("Save as a GGUF file (llama.cpp, Ollama), scored as shipped", _save),
    "evaluate": Action("Score on the held-out prompts and the capability benchmarks", _evaluate),
    "chat": Action("Chat with the model", _chat),
    "upload": Action("Upload to the Hugging Face hub", _upload),
}
