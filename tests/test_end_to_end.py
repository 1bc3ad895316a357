"""Headless runs on a tiny random model: trials, resume after interruption, export, reload."""

import json

import optuna
import pytest
import torch
from exports import exported_kl, run_and_save
from tiny import KL_ROUNDING, SMALL
from transformers import AutoModelForCausalLM, AutoTokenizer

from apostate.cli import main
from apostate.search.home import RunFolderHome
from apostate.search.study import completed
from apostate.search.trials import TrialRunner


def open_study(run_dir, fingerprint: dict, measured: bool = False) -> optuna.Study:
    """The run folder's study, as a run opens it (seed 1, one random trial before TPE)."""
    return RunFolderHome(run_dir).open(fingerprint, measured, seed=1, n_startup_trials=1)


def load_study(run_dir):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    storage = JournalStorage(JournalFileBackend(str(run_dir / "study.journal")))
    return optuna.load_study(study_name="apostate", storage=storage)


def run(model_dir, run_dir, *flags):
    return main([str(model_dir), "--run-dir", str(run_dir), *SMALL, *flags])


def test_interrupted_run_resumes_without_losing_trials(model_dir, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    original = TrialRunner.__call__
    calls = {"count": 0}

    def interrupt_third(self, trial):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt
        return original(self, trial)

    monkeypatch.setattr(TrialRunner, "__call__", interrupt_third)
    assert run(model_dir, run_dir, "--n-trials", "4", "--headless") == 130
    first = {t.number: t.values for t in completed(load_study(run_dir))}
    assert len(first) == 2
    assert (run_dir / "pareto.json").is_file()

    monkeypatch.setattr(TrialRunner, "__call__", original)
    assert run(model_dir, run_dir, "--n-trials", "4", "--headless") == 0
    trials = completed(load_study(run_dir))
    assert len(trials) == 4
    for trial in trials:  # the trials from before the interruption are still there, unchanged
        if trial.number in first:
            assert trial.values == first[trial.number]

    # More trials can be added later, and finished results shown again without new trials.
    assert run(model_dir, run_dir, "--n-trials", "5", "--headless") == 0
    assert len(completed(load_study(run_dir))) == 5
    assert run(model_dir, run_dir, "--n-trials", "9", "--headless", "--show-results") == 0
    assert len(completed(load_study(run_dir))) == 5
    pareto = json.loads((run_dir / "pareto.json").read_text())
    assert pareto["completed_trials"] == 5 and pareto["pareto"]
    entry = pareto["pareto"][0]
    assert {"number", "parameters", "refusal_rate", "kl"} <= set(entry)
    assert "base_refusal_rate" in pareto


def test_export_reloads_with_plain_transformers_and_matches_the_scored_model(model_dir, tmp_path):
    run_dir = tmp_path / "run"
    output = tmp_path / "exported"
    assert run_and_save(str(model_dir), run_dir, output, [*SMALL, "--n-trials", "3"], "--trial", "1") == 0
    record = json.loads((output / "apostate.json").read_text())
    assert record["trial"] == 1 and record["optuna_parameters"]
    assert (output / "README.md").is_file()

    tokenizer = AutoTokenizer.from_pretrained(output)
    exported = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    assert tokenizer.chat_template, "the chat template travels with the export"
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    generated = exported.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]

    # The exported weights are the base weights plus exactly the trial's edit.
    trial = next(t for t in completed(load_study(run_dir)) if t.number == 1)
    changed = [
        name for name, parameter in exported.state_dict().items() if not torch.equal(parameter, base.state_dict()[name])
    ]
    assert changed and all(name.endswith(("o_proj.weight", "down_proj.weight")) for name in changed)
    # Scored on the evaluation prompts, the exported model gives the KL the trial recorded.
    kl = exported_kl(model_dir, output, run_dir, SMALL)
    assert kl > 0
    assert kl == pytest.approx(trial.user_attrs["kl"], rel=1e-3, abs=KL_ROUNDING)


def test_adapter_export(model_dir, tmp_path):
    output = tmp_path / "adapter"
    code = run(
        model_dir,
        tmp_path / "run",
        "--n-trials",
        "2",
        "--headless",
        "--actions",
        "save-adapter",
        "--output-dir",
        str(output),
    )
    assert code == 0
    config = json.loads((output / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and (output / "adapter_model.safetensors").is_file()


def test_abandoned_running_trial_is_failed_on_reopen(tmp_path):
    study = open_study(tmp_path, {"a": 1})
    study.ask()  # as if the process was killed mid-trial
    reopened = open_study(tmp_path, {"a": 1})
    assert [t.state for t in reopened.trials] == [optuna.trial.TrialState.FAIL]


def test_resume_with_other_settings_is_refused(tmp_path):
    from apostate.errors import ApostateError

    open_study(tmp_path, {"row_normalization": "full"})
    with pytest.raises(ApostateError, match="changed: row_normalization"):
        open_study(tmp_path, {"row_normalization": "none"}, measured=True)
    # Nothing measured and no trial yet: the new settings are taken.
    study = open_study(tmp_path, {"row_normalization": "none"})
    assert study.user_attrs["fingerprint"] == {"row_normalization": "none"}


class _FakeMethod:
    """A method whose edit is broken or whose model is far off, to test the trial loop's handling."""

    def __init__(self, broken: bool):
        self.broken = broken

    def reset(self):
        pass

    def suggest(self, trial):
        return trial.suggest_float("x", 0.0, 1.0)

    def describe(self, parameters):
        return {"x": parameters}

    def edited_layers(self):
        return {3}

    def apply(self, parameters):
        from apostate.methods.context import BrokenEdit

        if self.broken:
            raise BrokenEdit("the fitted edit is not finite")


class _FakeScorer:
    harmful_count = 2

    def __init__(self, kl: float):
        self._kl = kl
        self.counted = 0

    def kl(self, model, edited_layers=None):
        assert edited_layers == {3}  # the trial loop tells the scorer what the method edited
        return self._kl

    def count(self, model, edited_layers=None):
        from apostate.scoring.verdicts import VerdictCounts

        self.counted += 1
        return VerdictCounts(refusals=1, broken=0, total=2)


@pytest.mark.parametrize(("broken", "kl"), [(True, 0.01), (False, 7.5)])
def test_broken_or_far_off_trials_are_infeasible_pruned_and_never_on_the_front(tmp_path, broken, kl):
    study = open_study(tmp_path, {"a": 1})
    good = TrialRunner(_FakeMethod(False), _FakeScorer(0.05), None, kl_cutoff=2.0)
    bad_scorer = _FakeScorer(kl)
    bad = TrialRunner(_FakeMethod(broken), bad_scorer, None, kl_cutoff=2.0)
    study.optimize(good, n_trials=1)
    study.optimize(bad, n_trials=1)
    finished = study.trials
    assert finished[0].state == optuna.trial.TrialState.COMPLETE and finished[0].constraints[
        "kl_cutoff"
    ] == pytest.approx(0.05 - 2.0)
    assert finished[1].state == optuna.trial.TrialState.PRUNED
    assert finished[1].constraints["kl_cutoff"] > 0  # infeasible for the sampler
    assert bad_scorer.counted == 0  # no refusal counting for an unusable model
    assert "infeasible" in finished[1].user_attrs and finished[1].values is None  # no made-up objective values
    assert [t.number for t in study.best_trials] == [0]


class _CountingScorer:
    """A scorer of 10 harmful prompts whose trial fails `failures` of them, stopping as the real one does."""

    harmful_count = 10

    def __init__(self, kl: float, failures: int):
        self._kl, self._failures = kl, failures
        self.asked = []

    def kl(self, model, edited_layers=None):
        return self._kl

    def count(self, model, edited_layers=None, enough_failures=None):
        from apostate.scoring.verdicts import VerdictCounts

        self.asked.append(enough_failures)
        if enough_failures is not None and self._failures >= enough_failures:
            return VerdictCounts(refusals=enough_failures, broken=0, total=enough_failures + 1)
        return VerdictCounts(refusals=self._failures, broken=0, total=10)


@pytest.mark.parametrize("stop", [True, False])
def test_a_trial_beaten_on_both_counts_stops_counting_and_is_never_on_the_front(tmp_path, stop):
    """With stop_dominated, counting asks for one failure more than the best scored trial at no higher
    KL has; a trial that reaches it is pruned (feasible, with why), and the front is what full
    counting gives."""
    study = open_study(tmp_path, {"a": 1})
    trials = [(0.05, 3), (0.08, 6), (0.08, 2), (0.03, 5)]  # (KL, failures): the second is beaten by the first
    scorers = [_CountingScorer(kl, failures) for kl, failures in trials]
    for scorer in scorers:
        study.optimize(TrialRunner(_FakeMethod(False), scorer, None, 2.0, stop_dominated=stop), n_trials=1)
    assert [t.number for t in study.best_trials] == [0, 2, 3]
    beaten = study.trials[1]
    if not stop:
        assert all(s.asked == [None] for s in scorers) and beaten.state == optuna.trial.TrialState.COMPLETE
        return
    assert [s.asked for s in scorers] == [[None], [4], [4], [None]]
    assert beaten.state == optuna.trial.TrialState.PRUNED and beaten.values is None
    assert beaten.constraints["kl_cutoff"] < 0  # feasible: beaten, not out of bounds
    assert "trial 0 has 3" in beaten.user_attrs["dominated"] and beaten.user_attrs["total"] == 5
    assert "infeasible" not in beaten.user_attrs


def test_trials_draft_from_the_base_models_responses_in_a_fresh_and_a_resumed_run(model_dir, tmp_path):
    """The base model's responses, measured at start-up (or read back from the run folder),
    are in the trial scorer's pool before the first trial, and they are its greedy responses."""
    from apostate.commands.run import start_session
    from apostate.decoding.generation import generate_plain
    from apostate.model.sources import resolve_source
    from apostate.monitor import PhaseMonitor
    from apostate.settings import parse_command_line

    settings = parse_command_line([str(model_dir), "--run-dir", str(tmp_path / "run"), *SMALL])
    source = resolve_source(settings.model, None, tmp_path)
    (tmp_path / "run").mkdir()
    pools = []
    for _ in range(2):  # the second session reads the start-up measurements back
        session = start_session(settings, source, tmp_path / "run", PhaseMonitor())
        pools.append(session.scorer.base_responses())
    assert pools[0] == pools[1] and all(pools[0])
    scorer, tokenizer = session.scorer, session.loaded.tokenizer
    full = generate_plain(session.model, tokenizer, scorer.harmful.texts, scorer.max_new_tokens, 8, "cpu", None, None)
    for tokens, text in zip(pools[0], full, strict=True):  # early-stopped responses: a start of the full one
        assert text.startswith(tokenizer.decode(tokens, skip_special_tokens=True))


def test_routed_linear_layers_are_restored_when_the_run_fails(model_dir, tmp_path, monkeypatch):
    """Kernel choices swap `forward` on Linear layers for the run; every way out of the run undoes it."""
    from apostate.commands import run as pipeline
    from apostate.decoding.kernel_timing import ROW_RANGES, KernelTimer

    monkeypatch.setattr(KernelTimer, "onednn_pays", lambda self, weight: (True,) * len(ROW_RANGES))
    sessions = []
    start_session = pipeline.start_session

    def keep(*args, **kwargs):
        sessions.append(start_session(*args, **kwargs))
        assert sessions[0].opened.kernels.routed  # the run does route layers
        return sessions[0]

    def fail(*args, **kwargs):
        raise RuntimeError("a failure inside the trial loop")

    monkeypatch.setattr(pipeline, "start_session", keep)
    monkeypatch.setattr(pipeline, "run_trials", fail)
    with pytest.raises(RuntimeError, match="inside the trial loop"):  # --debug: the error itself
        main([str(model_dir), "--run-dir", str(tmp_path / "run"), "--n-trials", "2", "--headless", *SMALL, "--debug"])
    linear = [m for m in sessions[0].model.modules() if isinstance(m, torch.nn.Linear)]
    assert linear and not any("forward" in vars(module) for module in linear)


def test_a_bug_is_one_line_without_debug_and_a_traceback_with_it(model_dir, tmp_path, monkeypatch, capsys):
    from apostate.commands import run as pipeline

    def bug(*args, **kwargs):
        raise KeyError("a bug in the trial loop")

    monkeypatch.setattr(pipeline, "run_trials", bug)
    arguments = [str(model_dir), "--run-dir", str(tmp_path / "run"), "--n-trials", "2", "--headless", *SMALL]
    assert main(arguments) == 1
    output = capsys.readouterr().err
    assert "Traceback" not in output
    assert "apostate: error: internal error: KeyError: 'a bug in the trial loop' (run again with --debug" in output
    monkeypatch.setenv("APOSTATE_DEBUG", "1")
    with pytest.raises(KeyError):
        main(arguments)


def test_startup_cache_is_plain_data_and_an_old_or_damaged_one_is_measured_again(tmp_path):
    import dataclasses

    from apostate.startup.measure import CACHE_VERSION, Startup, read_startup

    startup = Startup(4, "", torch.zeros(3, 8), torch.zeros(2, 5), 1, [[1, 2], []], {"residuals": 1.5})
    cache, key = tmp_path / "startup.pt", {"fingerprint": {"a": 1}, "dtype": "torch.float32", "batch_size": 0}
    torch.save({"key": key, "version": CACHE_VERSION, "startup": dataclasses.asdict(startup)}, cache)
    again = read_startup(cache, key)
    assert (
        again is not None and again.base_responses == [[1, 2], []] and torch.equal(again.directions, startup.directions)
    )
    assert read_startup(cache, {**key, "batch_size": 8}) is None  # measured for other settings
    torch.save({"key": key, "version": CACHE_VERSION, "startup": startup}, cache)  # a pickled object, as before
    assert read_startup(cache, key) is None
    cache.write_bytes(b"\x80\x04 not a checkpoint")
    assert read_startup(cache, key) is None
