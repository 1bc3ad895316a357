"""The front re-scored by the judge: the search counts with refusal markers on responses cut at
their first marker (fast); once it is over, the base model and every Pareto trial answer the
evaluation prompts again at full length (evaluation_response_tokens), and the configured judge
(scoring/judges) labels each answer.

Its counts are kept in the study as `judged_<trial number>` and `judged_base` user attributes
(finished trials cannot take new attributes), with the judge's name and the answers' length: a
front already judged so is not judged again, and its verdicts come from the run's cache anyway.
"""

from __future__ import annotations

from collections.abc import Iterable

import optuna

from apostate.progress import console
from apostate.scoring.verdicts import VerdictCounts
from apostate.search.pareto import judged_counts, pareto_trials
from apostate.session import Session


def judge_front(session: Session, extra: Iterable[optuna.trial.FrozenTrial] = ()) -> None:
    """Judge the base model, the Pareto trials and `extra` trials (the chosen one) with the
    session's judge, where not done yet."""
    study, judge = session.study, session.judge
    wanted = {t.number: t for t in [*pareto_trials(study), *extra]}
    tokens = session.settings.evaluation_response_tokens
    todo = [t for number, t in sorted(wanted.items()) if not _done(study, number, judge.name, tokens)]
    if not todo and _done(study, "base", judge.name, tokens):
        return
    console.print(
        f"Judging the responses of the base model and {len(todo)} Pareto trials with [bold]{judge.name}[/]..."
    )
    if not _done(study, "base", judge.name, tokens):
        session.method.reset()
        study.set_user_attr("judged_base", _judged(session, judge, None, tokens))
    for trial in todo:
        session.restore(trial)
        edited = session.method.edited_layers()
        study.set_user_attr(f"judged_{trial.number}", _judged(session, judge, edited, tokens))
    session.method.reset()


def _judged(session: Session, judge, edited_layers: set[int] | None, tokens: int) -> dict:
    scorer = session.scorer
    responses = scorer.responses(session.model, early_stop=False, edited_layers=edited_layers, max_new_tokens=tokens)
    counts = VerdictCounts.of(judge.verdicts(scorer.harmful_prompts, responses))
    return {**counts.as_dict(), "judge": judge.name, "tokens": tokens}


def _done(study: optuna.Study, number: int | str, judge_name: str, tokens: int) -> bool:
    counts = judged_counts(study, number)
    return bool(counts) and counts.get("judge") == judge_name and counts.get("tokens") == tokens
