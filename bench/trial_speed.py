"""Time a trial's scoring passes, plain against fast, on a finished run's trials (same verdicts?).

    .venv/bin/python bench/trial_speed.py -- MODEL --run-dir DIR [apostate settings of that run]

Replays the run's finished trials in order (or, in a run without any, --trials N random ones
from the method's search space, seed 0) and measures, per trial:
KL pass plain (every prompt from its first token) and fast (shared-prefix cache, layers
below the first edited one replayed, as in a run: the first trial records them); refusal
generation with transformers' generate (early stop on refusal, as before drafts existed) and
with drafts from earlier responses (the scorer's pool, filled as the replay goes). With
--full, also generates every response to full length with transformers' generate and checks
that the fast verdicts equal those.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import optuna


def main(argv: list[str]) -> None:
    from apostate.decoding.batching import last_position_logprobs
    from apostate.decoding.generation import generate_plain
    from apostate.model.sources import resolve_source
    from apostate.monitor import PhaseMonitor
    from apostate.scoring.scorer import kl_divergence
    from apostate.session import run_dir_for, start_session
    from apostate.settings import parse_command_line

    full = "--full" in argv
    count = int(argv[argv.index("--trials") + 1]) if "--trials" in argv else 6
    args = argv[argv.index("--") + 1 :]
    settings = parse_command_line(args)
    source = resolve_source(settings.model, settings.model_revision, settings.cache_path())
    monitor = PhaseMonitor()
    run_dir = run_dir_for(settings, source)
    run_dir.mkdir(parents=True, exist_ok=True)
    session = start_session(settings, source, run_dir, monitor)
    monitor.close()
    scorer, model = session.scorer, session.model
    harmless, harmful = scorer.harmless, scorer.harmful
    trials = [t.params for t in session.study.trials if t.state == optuna.trial.TrialState.COMPLETE][:count]
    if not trials:
        sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        for _ in range(count):
            trial = sampler.ask()
            session.method.suggest(trial)
            trials.append(trial.params)
    print(f"{len(trials)} trials; batch size {harmful.batch_size}; {len(harmful)} harmful prompts")
    session.method.reset()
    scorer.kl(model)
    scorer.verdicts(model)  # the base model's responses seed the pool, as in a run
    rows = []
    for number, params in enumerate(trials):
        session.method.reset()
        session.method.apply(session.method.suggest(optuna.trial.FixedTrial(params)))
        row = {"trial": number, "first edited layer": min(session.method.edited_layers(), default=None)}
        start = time.perf_counter()
        plain_logprobs = last_position_logprobs(
            model, harmless.tokenizer, harmless.texts, harmless.batch_size, harmless.device
        )
        row["kl plain"] = time.perf_counter() - start
        start = time.perf_counter()
        edited = session.method.edited_layers()  # as in a trial
        fast_kl = scorer.kl(model, edited)  # also gives the pool the model's signature
        row["kl fast"] = time.perf_counter() - start
        row["kl diff"] = abs(fast_kl - kl_divergence(scorer.base_logprobs, plain_logprobs))
        start = time.perf_counter()
        plain = generate_plain(model, harmful.tokenizer, harmful.texts, scorer.max_new_tokens, harmful.batch_size,
                               harmful.device, scorer.judge.decided, None)  # fmt: skip
        row["gen plain"] = time.perf_counter() - start
        start = time.perf_counter()
        before = dataclasses.replace(harmful.pool.stats)
        fast_flags = scorer.verdicts(model, edited_layers=edited)
        row["gen fast"] = time.perf_counter() - start
        after = harmful.pool.stats
        row["passes"] = after.passes - before.passes
        row["kept"] = f"{after.accepted - before.accepted}/{after.proposed - before.proposed}"
        row["tokens/pass"] = (after.generated - before.generated) / max(row["passes"], 1)
        a, b = harmful.pool.cost.coefficients()
        row["pass cost"] = f"{a:.3f}+{b * 1000:.2f}ms/token"
        plain_flags = scorer.judge.verdicts(scorer.harmful_prompts, plain)
        row["same (early stop)"] = plain_flags == fast_flags
        if full:
            texts = generate_plain(model, harmful.tokenizer, harmful.texts, scorer.max_new_tokens,
                                   harmful.batch_size, harmful.device, None, None)  # fmt: skip
            row["same (full)"] = scorer.judge.verdicts(scorer.harmful_prompts, texts) == fast_flags
        row["refusals"] = sum(verdict == "refusal" for verdict in fast_flags)
        rows.append(row)
        print("  ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in row.items()), flush=True)
    print("\nmedians:")
    for key in ("kl plain", "kl fast", "gen plain", "gen fast"):
        print(f"  {key}: {statistics.median(r[key] for r in rows):.2f} s")
    plain_total = statistics.median(r["kl plain"] + r["gen plain"] for r in rows)
    fast_total = statistics.median(r["kl fast"] + r["gen fast"] for r in rows)
    print(f"  scoring per trial: plain {plain_total:.1f} s, fast {fast_total:.1f} s ({plain_total / fast_total:.2f}x)")
    agree = [k for k in ("same (early stop)", "same (full)") if k in rows[0]]
    for key in agree:
        print(f"  {key}: {sum(r[key] for r in rows)}/{len(rows)} trials with identical verdicts")


if __name__ == "__main__":
    main(sys.argv[1:])
