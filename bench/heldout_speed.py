"""Time the held-out evaluation's passes, as they were against as they are (same verdicts?).

    .venv/bin/python bench/heldout_speed.py --trial N -- MODEL --run-dir DIR [apostate settings of that run]

For the base model, then trial N of a finished run, in one process, each step timed:
- "before": answers to the harmful prompts read to evaluation_response_tokens whatever they
  say, and the over-refusal check on the harmless prompts generated from scratch;
- "now" (commands/evaluate.py, scoring/scorer.py): with no judge, an answer stops at its
  first refusal marker (its verdict is decided there), and the over-refusal check is drafted
  from the base model's harmless answers that the k-token KL generated.
Prints seconds per step and whether the verdicts, over-refusals and KL agree.
"""

from __future__ import annotations

import sys
import time


def measured(label: str, times: dict, step):
    start = time.perf_counter()
    result = step()
    times[label] = time.perf_counter() - start
    return result


def heldout_steps(scorer, model, base: bool, now: bool, tokens: int) -> tuple[dict, dict]:
    """measure_heldout's steps: (seconds per step, results)."""
    times: dict[str, float] = {}
    if not now:
        scorer.harmless.pool = None  # as before: the harmless answers kept no drafts
    if base:
        measured("base answers and KL reference", times, lambda: scorer.record_base(model))
        kl = 0.0
    else:
        kl = measured("KL", times, lambda: scorer.kl(model))
    short = measured("short check", times, lambda: scorer.count(model))
    responses = measured(
        "full-length answers", times, lambda: scorer.responses(model, early_stop=now, max_new_tokens=tokens)
    )
    verdicts = scorer.judge.verdicts(scorer.harmful_prompts, responses)
    refused = measured("over-refusals", times, lambda: scorer.harmless_refusals(model))
    return times, {"kl": kl, "short": short, "verdicts": verdicts, "over-refusals": refused}


def main(argv: list[str]) -> None:
    from apostate.commands.evaluate import heldout_scorer
    from apostate.model.sources import resolve_source
    from apostate.monitor import PhaseMonitor
    from apostate.session import run_dir_for, start_session
    from apostate.settings import parse_command_line

    number = int(argv[argv.index("--trial") + 1])
    settings = parse_command_line(argv[argv.index("--") + 1 :])
    source = resolve_source(settings.model, settings.model_revision, settings.cache_path())
    monitor = PhaseMonitor()
    session = start_session(settings, source, run_dir_for(settings, source), monitor)
    monitor.close()
    trial = session.study.trials[number]
    tokens = settings.evaluation_response_tokens
    scorers = {False: heldout_scorer(session, evaluation=True), True: heldout_scorer(session, evaluation=True)}
    for label, base in (("base model", True), (f"trial {number}", False)):
        if base:
            session.method.reset()
        else:
            session.restore(trial)
        rows = {now: heldout_steps(scorers[now], session.model, base, now, tokens) for now in (False, True)}
        print(f"\n{label}: seconds per step (before -> now)")
        for step in rows[False][0]:
            print(f"  {step:32s} {rows[False][0][step]:8.1f} -> {rows[True][0][step]:8.1f}")
        total = {now: sum(rows[now][0].values()) for now in rows}
        print(f"  {'total':32s} {total[False]:8.1f} -> {total[True]:8.1f}")
        for key in ("verdicts", "over-refusals", "short"):
            print(f"  {key} equal: {rows[False][1][key] == rows[True][1][key]}")
        print(f"  KL before {rows[False][1]['kl']:.6f}, now {rows[True][1]['kl']:.6f}")


if __name__ == "__main__":
    main(sys.argv[1:])
