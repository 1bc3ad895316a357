"""Settings sources and validation; prompt loading and splitting."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from apostate.config_file import render_default_config
from apostate.errors import ApostateError
from apostate.prompts import load_prompts, split_prompts
from apostate.settings import PromptSetSpec, Settings, parse_command_line

ROOT = Path(__file__).resolve().parents[1]


def test_sources_merge_with_cli_over_env_over_toml(tmp_path, monkeypatch):
    config = tmp_path / "run.toml"
    config.write_text('n_trials = 4\nseed = 3\nsystem_prompt = "toml"\n[harmful]\nevaluation_count = 7\n')
    monkeypatch.setenv("APOSTATE_SEED", "9")
    monkeypatch.setenv("APOSTATE_HARMLESS__HELDOUT_COUNT", "11")
    settings = parse_command_line(["demo", "--config", str(config), "--n-trials", "6"])
    assert settings.n_trials == 6  # CLI beats TOML
    assert settings.seed == 9  # environment beats TOML
    assert settings.system_prompt == "toml"
    assert settings.harmful.evaluation_count == 7
    assert settings.harmful.source == "bundled:harmful"  # partial update keeps the other defaults
    assert settings.harmless.heldout_count == 11


def test_unknown_keys_are_rejected(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[harmless]\nsorce = 'x.txt'\n")
    with pytest.raises(ValidationError, match="sorce"):
        parse_command_line(["demo", "--config", str(config)])
    config.write_text("n_trails = 5\n")
    with pytest.raises(ValidationError, match="n_trails"):
        parse_command_line(["demo", "--config", str(config)])


@pytest.mark.parametrize(
    "flags",
    [
        ["--n-trials", "0"],
        ["--row-normalization", "half"],
        ["--search.max-weight", "[2, 1]"],
        ["--winsorization-quantile", "1.5"],
    ],
)
def test_invalid_values_are_rejected(flags):
    with pytest.raises(ValidationError):
        parse_command_line(["demo", *flags])


def test_default_config_file_is_in_sync_and_valid():
    committed = (ROOT / "config.default.toml").read_text()
    assert committed == render_default_config(), "regenerate: python -m apostate.config_file > config.default.toml"
    import tomllib

    data = tomllib.loads(committed)
    Settings(model="demo", **data)  # every key in it is accepted
    for name in Settings.model_fields:
        if name not in ("model", "config"):
            assert f"{name} =" in committed or f"[{name}]" in committed, f"{name} missing from config.default.toml"


def test_help_describes_every_field(capsys):
    with pytest.raises(SystemExit):
        parse_command_line(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name, field in Settings.model_fields.items():
        if name == "model":
            continue
        assert f"--{name.replace('_', '-')}" in text
        assert field.description.split(".")[0][:40] in text


def spec(source, **counts):
    return PromptSetSpec(source=str(source), **counts)


def test_local_prompt_formats(tmp_path):
    (tmp_path / "p.txt").write_text("first\n\n  second  \nfirst\n")
    assert load_prompts(spec(tmp_path / "p.txt")) == ["first", "second"]
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b"}) + "\n")
    assert load_prompts(spec(tmp_path / "p.jsonl")) == ["a", "b"]
    (tmp_path / "p.csv").write_text("id,question\n1,what?\n2,why?\n")
    assert load_prompts(spec(tmp_path / "p.csv")) == ["what?", "why?"]
    with_affixes = PromptSetSpec(source=str(tmp_path / "p.txt"), prefix="<", suffix=">")
    assert load_prompts(with_affixes) == ["<first>", "<second>"]


@pytest.mark.parametrize(
    "content,suffix,message",
    [
        ("\n\n", ".txt", "holds no prompts"),
        ('{"x": 1}\n', ".jsonl", "none of the columns"),
        ("{oops\n", ".jsonl", "not valid JSON"),
    ],
)
def test_bad_prompt_files_are_clear_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(ApostateError, match=message):
        load_prompts(spec(path))


def test_missing_prompt_file(tmp_path):
    with pytest.raises(ApostateError, match="does not exist"):
        load_prompts(spec(tmp_path / "nope.txt"))


def test_dataset_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ApostateError, match="cannot load prompt dataset 'someone/no-such-dataset'"):
        load_prompts(PromptSetSpec(source="someone/no-such-dataset", split="train"))


def test_splits_do_not_overlap_and_respect_counts():
    prompts = [f"prompt {i}" for i in range(50)]
    split = split_prompts(prompts, PromptSetSpec(source="x", direction_count=20, evaluation_count=10, heldout_count=5))
    assert (len(split.direction), len(split.evaluation), len(split.heldout)) == (20, 10, 5)
    assert not set(split.direction) & set(split.evaluation)
    assert not set(split.direction) & set(split.heldout)
    assert not set(split.evaluation) & set(split.heldout)
    with pytest.raises(ApostateError, match="has 50 prompts"):
        split_prompts(prompts, PromptSetSpec(source="x", direction_count=40, evaluation_count=10, heldout_count=5))


def test_bundled_sets_are_large_distinct_and_split_cleanly():
    harmless = load_prompts(PromptSetSpec(source="bundled:harmless"))
    harmful = load_prompts(PromptSetSpec(source="bundled:harmful"))
    assert len(harmless) >= 500 and len(harmful) >= 500
    assert not set(harmless) & set(harmful)
    defaults = Settings(model="demo")
    split_prompts(harmless, defaults.harmless)
    split_prompts(harmful, defaults.harmful)
