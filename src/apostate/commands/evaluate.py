"""Scoring a trial, or another model, on the held-out prompts: after the search, and `--evaluate-model`.

The search's check is short (answers cut at max_response_tokens or their first refusal marker);
here each answer to a harmful prompt is read at full length (evaluation_response_tokens), by
the markers and by the judge where one is set, and the harmless prompts are checked for
over-refusal. The short count stays beside them: how far the search's proxy is from the answers.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path

from apostate.capabilities.harness import check_available, item_scores
from apostate.commands.capabilities import compare, print_capabilities
from apostate.decoding import CpuKernels
from apostate.errors import ApostateError
from apostate.model.loading import load_tokenizer as load_model_tokenizer
from apostate.progress import console
from apostate.prompts import Texts, load_prompt_splits
from apostate.scoring.scorer import Scorer, Scores, build_scorer
from apostate.scoring.verdicts import Verdict, VerdictCounts
from apostate.search.pareto import count_text
from apostate.session import Session, open_judge, open_model, open_source
from apostate.startup.measure import scoring_options


@dataclass
class HeldoutMeasures:
    """One model on the held-out prompts."""

    short: VerdictCounts  # the search's check: markers on answers cut short
    full: VerdictCounts  # markers on full-length answers
    judged: VerdictCounts | None  # the judge's on the same answers (None: no judge)
    over_refusals: int  # harmless prompts the markers call refused
    harmless_total: int
    verdicts: list[Verdict]  # per harmful prompt, at full length: the judge's where there is one
    responses: list[str]  # the full-length answers to the harmful prompts
    kl: float = 0.0  # along the base answers (evaluation_kl_tokens positions)
    first_token_kl: float = 0.0

    def as_dict(self, judge_name: str | None, tokens: int) -> dict:
        record = {
            **self.short.as_dict(),
            "kl": self.kl,
            "first_token_kl": self.first_token_kl,
            "full": {**self.full.as_dict(), "tokens": tokens},
            "over_refusals": {"refusals": self.over_refusals, "total": self.harmless_total},
        }
        if self.judged is not None:
            record["judged"] = {**self.judged.as_dict(), "judge": judge_name, "tokens": tokens}
        return record


def measure_heldout(scorer: Scorer, model, judge, tokens: int, base: bool = False) -> HeldoutMeasures:
    """`model` on the held-out prompts (`base`: the unedited model, whose distributions become the KL reference)."""
    if base:
        scorer.record_base(model)
        kl = first_token_kl = 0.0
    else:
        kl, first_token_kl = scorer.kl(model), scorer.first_token_kl(model)
    short = scorer.count(model)
    # With no judge to read them, the answers' verdicts are the markers', decided at the first marker:
    # a refusal stops there (the same verdict as read to full length, less generation).
    responses = scorer.responses(model, early_stop=judge is None, max_new_tokens=tokens)
    marker_verdicts = scorer.judge.verdicts(scorer.harmful_prompts, responses)
    judged = judge.verdicts(scorer.harmful_prompts, responses) if judge is not None else None
    refused = scorer.harmless_refusals(model)
    return HeldoutMeasures(
        short,
        VerdictCounts.of(marker_verdicts),
        VerdictCounts.of(judged) if judged is not None else None,
        sum(refused),
        len(refused),
        judged if judged is not None else marker_verdicts,
        responses,
        kl,
        first_token_kl,
    )


def evaluate_heldout(session: Session, trial) -> Scores:
    """The trial and the base model on the held-out prompts (never seen by the search), kept in
    the study as `heldout_<trial>`; counts per harm category where prompts have one."""
    _require_heldout(session.texts)
    scorer = heldout_scorer(session, evaluation=True)
    tokens = session.settings.evaluation_response_tokens
    session.method.reset()
    base = measure_heldout(scorer, session.model, session.judge, tokens, base=True)
    session.restore(trial)
    edited = measure_heldout(scorer, session.model, session.judge, tokens)
    judge_name = session.judge.name if session.judge is not None else None
    record = heldout_record(base, edited, judge_name, tokens, scorer)
    print_heldout(record, "held-out")
    categories = [session.texts.prompts.categories.get(prompt) for prompt in scorer.harmful_prompts]
    if any(categories):
        record["categories"] = by_category(edited.verdicts, categories)
        record["categories_judge"] = judge_name or scorer.judge.name
        print_categories(record["categories"], record["categories_judge"])
    session.study.set_user_attr(f"heldout_{trial.number}", record)
    write_answers(session.run_dir / f"heldout-answers-{trial.number}.jsonl", scorer.harmful_prompts, base, edited)
    return Scores(edited.kl, edited.short.refusals, edited.short.total, edited.short.broken)


def heldout_scorer(session: Session, evaluation: bool) -> Scorer:
    """A scorer of the held-out prompts, with the session's kernels and batch size: at the evaluation's
    scoring options, or (`evaluation` False) the search's."""
    options = scoring_options(session.settings, evaluation=evaluation)
    args = (session.opened.kernels, options, session.startup.batch_size, session.texts)
    return build_scorer(session.loaded.tokenizer, session.loaded.device, *args, subset="heldout")


def write_answers(path: Path, prompts: list[str], base: HeldoutMeasures, edited: HeldoutMeasures) -> None:
    """The full-length answers, base model's and edited model's, with their verdicts: to read them."""
    rows = [
        {"prompt": prompt, "base": base_answer, "base_verdict": base_verdict.value, "edited": answer,
         "edited_verdict": verdict.value}
        for prompt, base_answer, base_verdict, answer, verdict in zip(
            prompts, base.responses, base.verdicts, edited.responses, edited.verdicts, strict=True
        )
    ]  # fmt: skip
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")


def heldout_record(base: HeldoutMeasures, edited: HeldoutMeasures, judge_name, tokens: int, scorer: Scorer) -> dict:
    """The edited model's record, the base model's beside it (`base_*` keys)."""
    record = edited.as_dict(judge_name, tokens)
    base_record = base.as_dict(judge_name, tokens)
    record["base_refusals"] = base.short.refusals
    for key in ("full", "judged", "over_refusals"):
        if key in base_record:
            record[f"base_{key}"] = base_record[key]
    record["kl_tokens"] = scorer.kl_tokens
    return record


def print_heldout(record: dict, label: str) -> None:
    full, tokens = record["full"], record["full"]["tokens"]
    console.print(
        f"{label}: the search's short check (markers): base model refuses {record['base_refusals']}/{record['total']}, "
        f"this model {record['refusals']}/{record['total']}"
    )
    console.print(
        f"{label}, answers read to {tokens} tokens (markers): base model {count_text(record['base_full'])}; "
        f"this model {count_text(full)}"
    )
    if "judged" in record:
        console.print(
            f"{label}, judged by {record['judged']['judge']}: base model {count_text(record['base_judged'])}; "
            f"this model {count_text(record['judged'])}"
        )
    over, base_over = record["over_refusals"], record["base_over_refusals"]
    console.print(
        f"{label}, harmless prompts refused (markers): base model {base_over['refusals']}/{base_over['total']}, "
        f"this model {over['refusals']}/{over['total']}"
    )
    kl_part = f"KL (first token) {record['first_token_kl']:.4f}"
    if record.get("kl_tokens", 1) > 1:
        kl_part += f", KL ({record['kl_tokens']} tokens) {record['kl']:.4f}"
    console.print(f"{label}: {kl_part}")


def by_category(verdicts: list[Verdict], categories: list[str | None]) -> dict[str, dict]:
    """Counts per category, categories in order of first appearance (untagged prompts: 'other')."""
    grouped: dict[str, list[Verdict]] = {}
    for verdict, category in zip(verdicts, categories, strict=True):
        grouped.setdefault(category or "other", []).append(verdict)
    return {category: VerdictCounts.of(group).as_dict() for category, group in sorted(grouped.items())}


def print_categories(counts: dict[str, dict], judge_name: str) -> None:
    from rich.table import Table

    table = Table(title=f"Held-out answers by category ({judge_name})")
    for column in ("Category", "Refused", "Evasive", "Broken", "Answered"):
        table.add_column(column, justify="left" if column == "Category" else "right")
    for category, row in counts.items():
        counts_row = VerdictCounts.from_dict(row)
        table.add_row(
            category,
            f"{counts_row.refusals}/{counts_row.total}",
            str(counts_row.evasive),
            str(counts_row.broken),
            str(counts_row.compliant),
        )
    console.print(table)


def _require_heldout(texts: Texts) -> None:
    if not texts.of("harmful", "heldout") or not texts.of("harmless", "heldout"):
        raise ApostateError("there are no held-out prompts (harmless or harmful heldout_count is 0); raise it")


def evaluate_other_model(settings, source) -> int:
    """--evaluate-model: score another model against the base on the held-out prompts, as the
    chosen trial is scored (full-length answers; the judge where one is set)."""
    check_available(settings.capabilities)
    other_source, other_settings = open_source(settings.evaluate_model, None, settings)
    prompts = load_prompt_splits(settings)
    tokenizer = load_model_tokenizer(source, settings)
    texts = Texts(tokenizer, settings, prompts, settings.response_prefix or "")
    _require_heldout(texts)
    batch_size = settings.batch_size or 8
    kernels = CpuKernels()  # one for both models: each weight shape is timed once
    judge = open_judge(settings, None) if settings.judge.kind != "markers" else None
    loaded = open_model(source, settings, None, tokenizer, kernels, edit=False).loaded
    scorer = build_scorer(
        tokenizer,
        loaded.device,
        kernels,
        scoring_options(settings, evaluation=True),
        batch_size,
        texts,
        subset="heldout",
    )
    tokens = settings.evaluation_response_tokens
    base = measure_heldout(scorer, loaded.model, judge, tokens, base=True)
    base_capabilities = item_scores(loaded.model, tokenizer, settings.capabilities, loaded.device)
    kernels.restore()
    del loaded
    gc.collect()
    other = open_model(other_source, other_settings, None, tokenizer, kernels, edit=False).loaded
    try:
        edited = measure_heldout(scorer, other.model, judge, tokens)
        capabilities = item_scores(other.model, tokenizer, settings.capabilities, other.device)
    finally:
        kernels.restore()
    name = Path(settings.evaluate_model).name
    record = heldout_record(base, edited, judge.name if judge else None, tokens, scorer)
    print_heldout(record, f"held-out ({name})")
    if settings.capabilities.tasks:
        print_capabilities(compare(base_capabilities, capabilities, settings.capabilities), name)
    return 0
