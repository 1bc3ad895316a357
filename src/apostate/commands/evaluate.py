"""Scoring a trial, or another model, on the held-out prompts: after the search, and `--evaluate-model`."""

from __future__ import annotations

import gc
from pathlib import Path

from apostate.decoding import CpuKernels
from apostate.errors import ApostateError
from apostate.model.loading import load_tokenizer as load_model_tokenizer
from apostate.progress import console
from apostate.prompts import Texts, load_prompt_splits
from apostate.scoring.scorer import Scores, build_scorer
from apostate.scoring.verdicts import Verdict, VerdictCounts
from apostate.search.pareto import count_text
from apostate.session import Session, open_model, open_source
from apostate.startup.measure import scoring_options


def evaluate_heldout(session: Session, trial) -> Scores:
    """Refusals and KL of a trial on the held-out prompts (never seen by the search); with a
    judge, its counts on the full responses too; refusals per harm category where prompts have one."""
    _require_heldout(session.texts)
    loaded = session.loaded
    args = (session.opened.kernels, scoring_options(session.settings), session.startup.batch_size, session.texts)
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


def _judged_verdicts(session: Session, scorer) -> list[Verdict] | None:
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
    other_source, other_settings = open_source(settings.evaluate_model, None, settings)
    prompts = load_prompt_splits(settings)
    tokenizer = load_model_tokenizer(source, settings)
    texts = Texts(tokenizer, settings, prompts, settings.response_prefix or "")
    _require_heldout(texts)
    batch_size = settings.batch_size or 8
    kernels = CpuKernels()  # one for both models: each weight shape is timed once
    loaded = open_model(source, settings, None, tokenizer, kernels, edit=False).loaded
    scorer = build_scorer(
        tokenizer, loaded.device, kernels, scoring_options(settings), batch_size, texts, subset="heldout"
    )
    base = scorer.record_base(loaded.model)
    kernels.restore()
    del loaded
    gc.collect()
    other = open_model(other_source, other_settings, None, tokenizer, kernels, edit=False).loaded
    try:
        scores = scorer.score(other.model)
    finally:
        kernels.restore()
    _print_comparison(f"held-out ({Path(settings.evaluate_model).name})", base, scores)
    return 0
