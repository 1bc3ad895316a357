"""Settings sources and validation; prompt loading and splitting."""

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from apostate.config_file import render_default_config
from apostate.errors import ApostateError
from apostate.prompts import load_prompt_splits, load_prompts, split_prompts
from apostate.settings import PromptSetSpec, Settings, parse_command_line

ROOT = Path(__file__).resolve().parents[1]


def test_sources_merge_with_cli_over_env_over_toml(tmp_path, monkeypatch):
    config = tmp_path / "run.toml"
    config.write_text(
        'n_trials = 4\nn_startup_trials = 2\nseed = 3\nsystem_prompt = "toml"\n[harmful]\nevaluation_count = 7\n'
    )
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


def test_settings_in_code_read_the_named_toml(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("n_trials = 4\nn_startup_trials = 2\n[harmful]\nevaluation_count = 7\n")
    settings = Settings(model="x", config=config)
    assert (settings.n_trials, settings.n_startup_trials, settings.harmful.evaluation_count) == (4, 2, 7)
    assert Settings(model="x", config=str(config), n_trials=5).n_trials == 5  # keyword arguments beat the TOML


def test_settings_in_code_read_the_local_toml_like_the_command_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "apostate.toml").write_text('n_trials = 4\nn_startup_trials = 2\nsystem_prompt = "toml"\n')
    in_code = Settings(model="x")
    assert (in_code.n_trials, in_code.system_prompt) == (4, "toml")
    assert Settings(model="x", config=None).n_trials == 120  # config=None: no TOML file
    flags = parse_command_line(["x", "--n-trials", "6"])
    assert (flags.n_trials, flags.system_prompt) == (6, "toml")  # flags beat the TOML
    assert flags.config == Path("apostate.toml")


def test_missing_config_file_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="config file .*nope.toml does not exist"):
        Settings(model="x", config=tmp_path / "nope.toml")
    with pytest.raises(FileNotFoundError, match="config file nope.toml does not exist"):
        parse_command_line(["x", "--config", "nope.toml"])
    (tmp_path / "folder.toml").mkdir()
    with pytest.raises(FileNotFoundError, match="is not a file"):
        Settings(model="x", config="folder.toml")


def test_more_startup_trials_than_trials_is_an_error_not_a_clamp(tmp_path, capsys):
    message = r"n_startup_trials \(30\) is more than n_trials \(10\): lower --n-startup-trials or raise --n-trials"
    with pytest.raises(ValidationError, match=message):
        parse_command_line(["demo", "--n-trials", "10"])
    with pytest.raises(ValidationError, match="n_startup_trials"):
        Settings(model="x", config=None, n_trials=3, n_startup_trials=4)
    assert Settings(model="x", config=None, n_trials=3, n_startup_trials=3).n_startup_trials == 3

    from apostate.cli import main

    assert main(["demo", "--n-trials", "10"]) == 2
    output = capsys.readouterr()
    assert "lower --n-startup-trials or raise --n-trials" in output.out + output.err


@pytest.mark.parametrize(
    "flags,message",
    [
        (
            ["--directional.search.direction-index", "[0.5, 1.2]"],
            "directional.search.direction_index: upper bound 1.2 is above 1.0",
        ),
        (
            ["--directional.search.min-weight-distance", "[-0.1, 0.5]"],
            "directional.search.min_weight_distance: lower bound -0.1 is below",
        ),
        (["--ara.layer-start", "[0.2, 1.5]"], "ara.layer_start: upper bound 1.5 is above 1.0"),
        (["--ara.layer-span", "[-0.2, 0.5]"], "ara.layer_span: lower bound -0.2 is below 0.0"),
        (["--ara.neighbours", "[0, 4]"], "ara.neighbours: lower bound 0 is below 1"),
    ],
)
def test_ranges_that_cannot_hold_are_errors(flags, message):
    with pytest.raises(ValidationError, match=message):
        parse_command_line(["demo", *flags])


@pytest.mark.parametrize(
    "flags",
    [
        ["--n-trials", "0"],
        ["--directional.row-normalization", "half"],
        ["--directional.search.max-weight", "[2, 1]"],
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
        ('{"prompt": "a"}\n"b"\n', ".jsonl", ":2: a JSON string, but line 1 is a JSON object"),
        ('"a"\n{"prompt": "b"}\n', ".jsonl", ":2: a JSON object, but line 1 is a JSON string"),
        ('"a"\n[1]\n', ".jsonl", ":2: a JSON array; every line must be a JSON object or a JSON string"),
        ('{"prompt": "a"}\n{"text": "b"}\n', ".jsonl", ":2: no key 'prompt'"),
        ("id,body\n1,what?\n", ".csv", "none of the columns"),
    ],
)
def test_bad_prompt_files_are_clear_errors(tmp_path, content, suffix, message):
    path = tmp_path / f"bad{suffix}"
    path.write_text(content)
    with pytest.raises(ApostateError, match=message):
        load_prompts(spec(path))


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_prompt_file_that_is_not_utf8(tmp_path, suffix):
    path = tmp_path / f"binary{suffix}"
    path.write_bytes(b"ok\n\xff\xfe\x00bad")
    with pytest.raises(ApostateError, match=r"is not UTF-8 text \(byte 0xff on line 2\); save it as UTF-8"):
        load_prompts(spec(path))


def test_prompt_file_with_a_byte_order_mark(tmp_path):
    (tmp_path / "bom.csv").write_bytes("prompt,id\nwhat?,1\n".encode("utf-8-sig"))
    assert load_prompts(spec(tmp_path / "bom.csv")) == ["what?"]


def test_folder_is_not_a_prompt_file(tmp_path):
    with pytest.raises(ApostateError, match="is a folder; give a .txt, .jsonl or .csv file"):
        load_prompts(spec(tmp_path))


def test_prompts_in_both_sets_are_an_error(tmp_path):
    (tmp_path / "a.txt").write_text("\n".join(f"harmless {i}" for i in range(20)) + "\nboth\n")
    (tmp_path / "b.txt").write_text("both\n" + "\n".join(f"harmful {i}" for i in range(20)))
    counts = {"direction_count": 5, "evaluation_count": 5, "heldout_count": 0}
    settings = Settings(
        model="x", config=None, harmless=spec(tmp_path / "a.txt", **counts), harmful=spec(tmp_path / "b.txt", **counts)
    )
    with pytest.raises(ApostateError, match=r"share 1 prompt \(first: 'both'\)"):
        load_prompt_splits(settings)
    (tmp_path / "b.txt").write_text("\n".join(f"harmful {i}" for i in range(20)))
    assert len(load_prompt_splits(settings).harmful.direction) == 5


def test_config_file_that_is_not_toml_names_the_file(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text("[harmless\n")
    with pytest.raises(ApostateError, match=r"config file .*run.toml is not valid TOML: .*\(at line 1, column 10\)"):
        Settings(model="x", config=config)
    with pytest.raises(ApostateError, match="run.toml is not valid TOML"):
        parse_command_line(["x", "--config", str(config)])
    config.write_bytes(b"n_trials = '\xff'\n")
    with pytest.raises(ApostateError, match="run.toml is not UTF-8 text"):
        Settings(model="x", config=config)


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


def test_bundled_harmful_prompts_are_tagged_and_every_split_covers_the_categories_evenly():
    from collections import Counter

    from apostate.prompts import load_prompt_rows

    rows = load_prompt_rows(PromptSetSpec(source="bundled:harmful"))
    assert all(category for _, category in rows)
    per_category = Counter(category for _, category in rows)
    assert len(per_category) == 12 and set(per_category.values()) == {48}
    splits = load_prompt_splits(Settings(model="demo", config=None))
    for subset in ("direction", "evaluation", "heldout"):
        counts = Counter(splits.categories[prompt] for prompt in getattr(splits.harmful, subset))
        assert len(counts) == 12 and max(counts.values()) - min(counts.values()) <= 1, (subset, counts)
    assert not any(prompt in splits.categories for prompt in splits.harmless.evaluation)  # untagged


def test_a_category_column_tags_local_prompts_and_untagged_sets_split_as_before(tmp_path):
    from apostate.prompts import load_prompt_rows

    tagged = tmp_path / "p.csv"
    tagged.write_text("prompt,category\na,x\nb,y\nc,\n")
    assert load_prompt_rows(PromptSetSpec(source=str(tagged), column="prompt")) == [("a", "x"), ("b", "y"), ("c", None)]
    prompts = [f"p{i}" for i in range(30)]
    spec = PromptSetSpec(source="x", direction_count=10, evaluation_count=10, heldout_count=10)
    assert split_prompts(prompts, spec) == split_prompts(prompts, spec, categories={})
