"""Real responses of the demo model, from the base model to edits far too strong: the raw
material of the hand-labelled judge set (bench/data/judge_labels.jsonl).

    .venv/bin/python bench/judge_responses.py RUN_DIR OUT.jsonl [--tokens 48]

RUN_DIR: a finished demo run (examples/demo-quick.toml); its Pareto trials give edits of
every strength the search found. Each model answers the held-out harmful prompts and some
held-out harmless ones, greedily, `--tokens` long (no early stop): the base model; the front's
weakest, middle and strongest trials; and the strongest trial with every weight scaled by
2 and by 3.5 (past what the search allows, so that the model breaks). One JSON line per
(model, prompt): {"model", "side", "prompt", "response"}.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from apostate.decoding import PromptSet  # noqa: E402
from apostate.model.sources import resolve_source  # noqa: E402
from apostate.monitor import PhaseMonitor  # noqa: E402
from apostate.search.pareto import pareto_trials  # noqa: E402
from apostate.session import start_session  # noqa: E402
from apostate.settings import parse_command_line  # noqa: E402

SCALES = (2.0, 3.5)


def scaled(params: dict, factor: float) -> dict:
    """A trial's parameters with every component's peak weight multiplied by `factor`."""
    return {name: value * factor if name.endswith(".max_weight") else value for name, value in params.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--harmless", type=int, default=30, help="held-out harmless prompts per model")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", message="The value .* is out of the range")  # the scaled edits

    work = args.out.parent / "judge-responses-run"
    work.mkdir(parents=True, exist_ok=True)
    argv = ["demo", "--config", str(REPO / "examples/demo-quick.toml"), "--run-dir", str(work)]
    settings = parse_command_line(argv + ["--n-trials", "1", "--n-startup-trials", "1"])
    source = resolve_source(settings.model, None, settings.cache_path())
    session = start_session(settings, source, work, PhaseMonitor())
    backend = JournalFileBackend(str(args.run_dir / "study.journal"))
    reference = optuna.load_study(study_name="apostate", storage=optuna.storages.JournalStorage(backend))
    front = sorted(pareto_trials(reference), key=lambda t: t.user_attrs["kl"])
    strongest = front[-1]
    models = {"base": None, f"trial {front[0].number} (weakest)": front[0].params}
    models[f"trial {front[len(front) // 2].number} (middle)"] = front[len(front) // 2].params
    models[f"trial {strongest.number} (strongest)"] = strongest.params
    for factor in SCALES:
        models[f"trial {strongest.number} x{factor}"] = scaled(strongest.params, factor)

    tokenizer, device = session.loaded.tokenizer, session.loaded.device
    sides = {
        "harmful": session.texts.prompts.harmful.heldout,
        "harmless": session.texts.prompts.harmless.heldout[: args.harmless],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("w", encoding="utf-8") as out:
        for name, params in models.items():
            session.method.reset()
            if params is not None:
                session.method.apply(session.method.suggest(optuna.trial.FixedTrial(params)))
            for side, prompts in sides.items():
                texts = session.texts.of(side, "heldout")[: len(prompts)]
                prompt_set = PromptSet(tokenizer, texts, session.startup.batch_size, device, session.opened.kernels)
                responses = prompt_set.greedy_responses(session.model, args.tokens)
                for prompt, response in zip(prompts, responses, strict=True):
                    row = {"model": name, "side": side, "prompt": prompt, "response": response}
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
                print(f"{name}: {side} {len(responses)} responses", flush=True)
    session.close()


if __name__ == "__main__":
    main()
