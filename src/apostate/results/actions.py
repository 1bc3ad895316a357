"""After the search: pick a trial (interactively or by rule) and act on it."""

from __future__ import annotations

import gc
from pathlib import Path

import optuna

from ..errors import ApostateError
from ..progress import can_ask, console
from ..prompts import Texts, load_prompt_splits
from ..scoring import Scores, build_scorer, scores_line
from ..scoring.verdicts import Verdict, VerdictCounts
from ..search.judged import judge_front
from ..search.pareto import count_text, failures, judged_counts, pareto_trials, trial_record
from ..search.study import completed
from .chosen import record_chosen
from .export import TrialSummary, save_adapter, save_merged
from .reproduce import recipe

ACTION_LABELS = {
    "save": "Save the merged model",
    "save-adapter": "Save the LoRA adapter only",
    "evaluate": "Score on the held-out prompts",
    "chat": "Chat with the model",
    "upload": "Upload to the Hugging Face hub",
}


def pick_trial(session) -> optuna.trial.FrozenTrial:
    """--trial N, else (headless) the fewest failures (refusals and broken responses; the judge's
    counts where it re-scored the front) among Pareto trials with KL <= pick_max_kl."""
    settings = session.settings
    if settings.trial is not None:
        by_number = {t.number: t for t in completed(session.study)}
        if settings.trial not in by_number:
            raise ApostateError(f"trial {settings.trial} is not a finished trial of this run")
        return by_number[settings.trial]
    front = pareto_trials(session.study)
    within = [t for t in front if t.user_attrs["kl"] <= settings.pick_max_kl]
    if not within:
        console.print(f"[yellow]No Pareto trial has KL <= {settings.pick_max_kl}; taking the lowest-KL one.[/]")
        return min(front, key=lambda t: t.user_attrs["kl"])
    return min(within, key=lambda t: (_judged_failures(session.study, t), t.user_attrs["kl"]))


def _judged_failures(study, trial) -> int:
    counts = judged_counts(study, trial.number)
    return counts["refusals"] + counts["broken"] if counts else failures(trial)


def act(session) -> None:
    if session.settings.headless:
        trial = pick_trial(session)
        if session.judge is not None:
            judge_front(session, session.judge, extra=[trial])
        _announce(session.study, trial)
        record_chosen(session, trial)  # leaves the model in the trial's state
        for action in sorted(session.settings.actions, key=_action_order):
            perform(session, trial, action)
        return
    _interactive(session)


def _action_order(action: str) -> int:
    """Headless actions run in the order given, but an evaluation goes first, so that a saved model's
    card carries its held-out scores, and an upload last, so that it publishes what the saves wrote."""
    return (action != "evaluate") + (action == "upload")


def _interactive(session) -> None:
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
            options = [questionary.Choice(label, value=key) for key, label in ACTION_LABELS.items()]
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
    attrs = trial.user_attrs
    line = scores_line(attrs["refusals"], attrs["total"], attrs["kl"], attrs.get("broken", 0))
    judged = judged_counts(study, trial.number)
    return f"{line} (judged: {count_text(judged)})" if judged else line


def _announce(study, trial) -> None:
    console.print(f"Using trial [bold]{trial.number}[/]: {_trial_scores(study, trial)}")


def perform(session, trial, action: str) -> None:
    settings = session.settings
    if action == "evaluate":
        evaluate_heldout(session, trial)
    elif action == "chat":
        from .chat import chat

        chat(session.model, session.loaded.tokenizer, settings.system_prompt, session.loaded.device)
    elif action == "upload":
        _upload(session, trial)
    elif action in ("save", "save-adapter"):
        output = _export_folder(session, action)
        summary = _summary(session, trial)
        from .upload import holds_export

        if settings.storage is not None and holds_export(output, _export_identity(summary)):
            console.print(f"{output} already holds trial {trial.number}'s export (another worker saved it); kept")
            return
        if action == "save":
            path = save_merged(
                session.source,
                session.method.deltas(),
                session.loaded.tokenizer,
                output,
                settings.max_shard_size,
                summary,
                settings.trust_remote_code,
            )
        else:
            if not session.method.edits_in_adapter:
                raise ApostateError(
                    f"method '{settings.method}' edits full weights (any rank), which a LoRA adapter cannot hold; "
                    "save the merged model, or use method 'ara-lora'"
                )
            path = save_adapter(session.source, session.adapter, session.loaded.tokenizer, output, summary)
        console.print(f"Saved to [bold]{path}[/]")


def _export_folder(session, action: str) -> Path:
    """Where a save action writes: --output-dir, else <run_dir>/model or <run_dir>/adapter."""
    return session.settings.output_dir or session.run_dir / ("model" if action == "save" else "adapter")


def _upload(session, trial) -> None:
    """Publish the trial's export on the hub; saved first unless its folder already holds it."""
    from . import upload

    settings = session.settings
    ask = can_ask(settings.headless)
    chosen = upload.destination(settings.upload, ask)
    if chosen is None:
        console.print("Upload cancelled.")
        return
    token = upload.upload_token(ask)
    save = "save" if settings.upload.export == "model" else "save-adapter"
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


def _summary(session, trial) -> TrialSummary:
    record = trial_record(trial, judged_counts(session.study, trial.number))
    evaluation = {key: record[key] for key in ("refusals", "broken", "total", "kl")}
    evaluation["base_refusals"] = session.startup.base_refusals
    if "judged" in record:
        evaluation["judged"] = record["judged"]
        evaluation["base_judged"] = judged_counts(session.study, "base")
    scores = {"evaluation": evaluation}
    heldout = trial.user_attrs.get("heldout") or session.study.user_attrs.get(f"heldout_{trial.number}")
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
    )


def evaluate_heldout(session, trial) -> Scores:
    """Refusals and KL of a trial on the held-out prompts (never seen by the search); with a
    judge, its counts on the full responses too; refusals per harm category where prompts have one."""
    _require_heldout(session.texts)
    loaded = session.loaded
    args = (session.kernels, session.settings, session.startup.batch_size, session.texts)
    scorer = build_scorer(loaded.tokenizer, loaded.device, *args, subset="heldout")
    session.method.reset()
    base = scorer.record_base(session.model)
    base_verdicts = _judged_verdicts(session, scorer)
    session.restore(trial)
    kl = scorer.kl(session.model)
    verdicts = scorer.verdicts(session.model)
    counts = VerdictCounts.of(verdicts)
    scores = Scores(kl, counts.refusals, counts.total, counts.broken)
    _print_comparison("held-out", base, scores)
    record = {**counts.as_dict(), "kl": kl, "base_refusals": base.refusals}
    judged = _judged_verdicts(session, scorer)
    if judged is not None:
        record["judged"] = {**VerdictCounts.of(judged).as_dict(), "judge": session.judge.name}
        record["base_judged"] = VerdictCounts.of(base_verdicts).as_dict()
        console.print(
            f"held-out, judged by {session.judge.name}: base model {count_text(record['base_judged'])}; "
            f"this model {count_text(record['judged'])}"
        )
    categories = [session.texts.prompts.categories.get(prompt) for prompt in scorer.harmful_prompts]
    if any(categories):
        record["categories"] = by_category(judged or verdicts, categories)
        record["categories_judge"] = session.judge.name if judged is not None else scorer.judge.name
        print_categories(record["categories"], record["categories_judge"])
    session.study.set_user_attr(f"heldout_{trial.number}", record)
    return scores


def _judged_verdicts(session, scorer) -> list[Verdict] | None:
    """The judge's verdicts on the model's full responses as it stands (None without a judge)."""
    if session.judge is None:
        return None
    responses = scorer.responses(session.model, early_stop=False)
    return session.judge.verdicts(scorer.harmful_prompts, responses)


def by_category(verdicts: list[Verdict], categories: list[str | None]) -> dict[str, dict]:
    """Counts per category, categories in order of first appearance (untagged prompts: 'other')."""
    grouped: dict[str, list[Verdict]] = {}
    for verdict, category in zip(verdicts, categories, strict=True):
        grouped.setdefault(category or "other", []).append(verdict)
    return {category: VerdictCounts.of(group).as_dict() for category, group in sorted(grouped.items())}


def print_categories(counts: dict[str, dict], judge_name: str) -> None:
    from rich.table import Table

    table = Table(title=f"Held-out refusals by category ({judge_name})")
    for column in ("Category", "Refused", "Broken", "Answered"):
        table.add_column(column, justify="left" if column == "Category" else "right")
    for category, row in counts.items():
        answered = row["total"] - row["refusals"] - row["broken"]
        table.add_row(category, f"{row['refusals']}/{row['total']}", str(row["broken"]), str(answered))
    console.print(table)


def _require_heldout(texts: Texts) -> None:
    if not texts.of("harmful", "heldout") or not texts.of("harmless", "heldout"):
        raise ApostateError("there are no held-out prompts (harmless or harmful heldout_count is 0); raise it")


def _print_comparison(label: str, base: Scores, scores: Scores) -> None:
    console.print(
        f"{label}: base model refuses {base.refusals}/{base.total} ({base.refusal_rate:.1%}); this model: {scores}"
    )


def evaluate_other_model(settings, source) -> int:
    """--evaluate-model: score another model against the base on the held-out prompts."""
    from ..decoding import CpuKernels
    from ..model.loading import check_model, load_tokenizer
    from ..model.sources import resolve_source
    from ..search.startup import load_for_trials

    other_source = resolve_source(settings.evaluate_model, None, settings.cache_path())
    other_settings = check_model(other_source, settings, can_ask(settings.headless))
    prompts = load_prompt_splits(settings)
    tokenizer = load_tokenizer(source, settings)
    texts = Texts(tokenizer, settings, prompts, settings.response_prefix or "")
    _require_heldout(texts)
    batch_size = settings.batch_size or 8
    kernels = CpuKernels()  # one for both models: each weight shape is timed once
    loaded = load_for_trials(source, settings, tokenizer, kernels)
    scorer = build_scorer(tokenizer, loaded.device, kernels, settings, batch_size, texts, subset="heldout")
    base = scorer.record_base(loaded.model)
    kernels.restore()
    del loaded
    gc.collect()
    other = load_for_trials(other_source, other_settings, tokenizer, kernels)
    try:
        scores = scorer.score(other.model)
    finally:
        kernels.restore()
    _print_comparison(f"held-out ({Path(settings.evaluate_model).name})", base, scores)
    return 0
