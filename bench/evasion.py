"""Does fitting ARA at more prompt positions (`ara.fit_positions`) leave fewer evasive answers at
the same KL? Re-fits one finished trial's parameters with each setting, finds the steer weight
that matches the trial's own held-out KL, and writes the held-out harmful answers, read in full,
for labelling.

    .venv/bin/python bench/evasion.py RUN_DIR --trial 17 [--fit-positions 1 6] [--tokens 256]
        [--config examples/demo-quick.toml] [--out DIR]

RUN_DIR: a finished `ara-lora` run of the config (its study and start-up are reused). For each
--fit-positions value: the trial's parameters with the steer weight scaled by each of --scales;
the scale whose held-out first-token KL is closest to the trial's as it ran (fit_positions 1,
scale 1; or --target-kl) is answered at --tokens tokens on the held-out harmful prompts. Writes
`OUT/answers-p<positions>.jsonl` (prompt, category, answer, marker verdict) and prints a row per
setting: KL (first token and along 32 base-answer tokens), the short marker count, markers at
full length, and over-refusals on the harmless held-out prompts. Labels come after: by hand,
or `bench/judge_responses.py`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import optuna

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from apostate.commands.evaluate import measure_heldout  # noqa: E402
from apostate.methods.protocol import restore  # noqa: E402
from apostate.model.sources import resolve_source  # noqa: E402
from apostate.monitor import PhaseMonitor  # noqa: E402
from apostate.scoring.scorer import build_scorer  # noqa: E402
from apostate.session import build_method, start_session  # noqa: E402
from apostate.settings import parse_command_line  # noqa: E402
from apostate.startup.measure import scoring_options  # noqa: E402


def scaled(params: dict, scale: float) -> dict:
    return {**params, "steer_weight": params["steer_weight"] * scale}


def write_answers(path: Path, session, scorer, measures) -> None:
    categories = [session.texts.prompts.categories.get(p) for p in scorer.harmful_prompts]
    with open(path, "w") as handle:
        for prompt, category, answer, verdict in zip(
            scorer.harmful_prompts, categories, measures.responses, measures.verdicts, strict=True
        ):
            row = {"prompt": prompt, "category": category, "answer": answer, "markers": verdict.value}
            handle.write(json.dumps(row) + "\n")


def print_edit_seconds(methods: dict, params: dict, repeats: int) -> None:
    """Seconds to fit and write the trial's edit, per setting, timed in turns (median of `repeats`)."""
    times = {positions: [] for positions in methods}
    for _ in range(repeats):
        for positions, method in methods.items():
            start = time.perf_counter()
            restore(method, params)
            times[positions].append(time.perf_counter() - start)
            method.reset()
    for positions, values in times.items():
        print(f"fit_positions {positions}: {statistics.median(values):.1f} s per edit ({repeats} in turns)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--trial", type=int, required=True)
    parser.add_argument("--fit-positions", type=int, nargs="+", default=[1, 6])
    parser.add_argument("--scales", type=float, nargs="+", default=[0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0])
    parser.add_argument("--time-edits", type=int, default=0, help="only time N edits per setting, in turns")
    parser.add_argument("--target-kl", type=float, help="match this KL instead of the trial's (skips answering it)")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--config", default=str(REPO / "examples/demo-quick.toml"))
    parser.add_argument("--out", type=Path, default=Path("evasion"))
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = parse_command_line(["demo", "--config", args.config, "--run-dir", str(args.run_dir)])
    source = resolve_source(settings.model, None, settings.cache_path())
    monitor = PhaseMonitor()
    session = start_session(settings, source, args.run_dir, monitor)
    trial = session.study.trials[args.trial]
    options = scoring_options(settings, evaluation=True)
    scorer = build_scorer(
        session.loaded.tokenizer,
        session.loaded.device,
        session.opened.kernels,
        options,
        session.startup.batch_size,
        session.texts,
        subset="heldout",
    )
    session.method.reset()
    scorer.record_base(session.model)
    methods = {}
    for positions in args.fit_positions:  # captured from the unedited model
        own = settings.ara.model_copy(update={"fit_positions": positions})
        variant = settings.model_copy(update={"ara": own})
        methods[positions] = (
            session.method
            if positions == 1
            else build_method(
                session.opened, variant, session.startup.directions, session.texts, session.startup.batch_size, monitor
            )
        )
    if args.time_edits:
        print_edit_seconds(methods, trial.params, args.time_edits)
        session.close()
        return
    target = args.target_kl
    print("positions  scale  heldout KL@1  KL@32  short  markers@full (refused/broken)  over-refusals  seconds")
    for positions, method in methods.items():
        if positions == 1 and args.target_kl is not None:
            continue  # the trial as it ran: answered before
        kls = {}
        for scale in args.scales if target is not None else [1.0]:
            restore(method, scaled(trial.params, scale))
            kls[scale] = scorer.first_token_kl(session.model)
            print(f"  p={positions} scale {scale}: KL@1 {kls[scale]:.4f}", flush=True)
        if target is None:
            target = kls[1.0]
        scale = min(kls, key=lambda s: abs(kls[s] - target))
        restore(method, scaled(trial.params, scale))
        start = time.perf_counter()
        measures = measure_heldout(scorer, session.model, None, args.tokens)
        seconds = time.perf_counter() - start
        write_answers(args.out / f"answers-p{positions}.jsonl", session, scorer, measures)
        summary = {
            "positions": positions,
            "scale": scale,
            "kl": measures.first_token_kl,
            "kl_32": measures.kl,
            "short": measures.short.as_dict(),
            "full_markers": measures.full.as_dict(),
            "over_refusals": [measures.over_refusals, measures.harmless_total],
        }
        (args.out / f"summary-p{positions}.json").write_text(json.dumps(summary, indent=1))
        print(
            f"{positions:>9}  {scale:5.2f}  {measures.first_token_kl:12.4f}  {measures.kl:.4f}  "
            f"{measures.short.refusals:>2}/{measures.short.total}  "
            f"{measures.full.refusals:>3}/{measures.full.broken:<3}  "
            f"{measures.over_refusals:>3}/{measures.harmless_total}  {seconds:.0f}",
            flush=True,
        )
        method.reset()
    session.close()


if __name__ == "__main__":
    main()
