"""Bad input: one clear error line, a non-zero exit, no traceback."""

import subprocess
import sys

import pytest
from tiny import tiny_model_folder

from apostate.cli import main


def single_error_line(capsys, code) -> str:
    captured = capsys.readouterr()
    output = captured.err + captured.out
    assert code != 0
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.startswith("apostate: error:")]
    assert len(lines) == 1, output
    return lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("tiny") / "tiny")


def test_unknown_model_path(tmp_path, capsys):
    code = main([str(tmp_path / "missing-model"), "--run-dir", str(tmp_path / "run")])
    assert "does not exist" in single_error_line(capsys, code)


def test_missing_gguf_file(tmp_path, capsys):
    code = main([str(tmp_path / "model.gguf"), "--run-dir", str(tmp_path / "run")])
    assert "GGUF file" in single_error_line(capsys, code)


def test_model_without_chat_template(tmp_path, capsys):
    folder = tiny_model_folder(tmp_path / "plain", chat_template=None)
    code = main([str(folder), "--run-dir", str(tmp_path / "run"), "--dtypes", "float32"])
    assert "no chat template" in single_error_line(capsys, code)


def test_empty_prompt_file(tmp_path, capsys, model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    code = main([str(model_dir), "--run-dir", str(tmp_path / "run"), "--harmful.source", str(empty)])
    assert "holds no prompts" in single_error_line(capsys, code)


def test_invalid_config_value(tmp_path, capsys, model_dir):
    config = tmp_path / "bad.toml"
    config.write_text("max_response_tokens = -3\n")
    code = main([str(model_dir), "--config", str(config)])
    line = single_error_line(capsys, code)
    assert "max_response_tokens" in line and "greater than" in line


def test_missing_config_file(tmp_path, capsys, model_dir):
    code = main([str(model_dir), "--config", str(tmp_path / "nope.toml")])
    assert "nope.toml does not exist" in single_error_line(capsys, code)


def test_dataset_id_while_offline(tmp_path, capsys, model_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    code = main([str(model_dir), "--run-dir", str(tmp_path / "run"), "--harmful.source", "nobody/harmful-things"])
    assert "cannot load prompt dataset 'nobody/harmful-things'" in single_error_line(capsys, code)


def test_hub_id_while_offline(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time
    code = main(["nobody/no-such-model", "--run-dir", str(tmp_path / "run")])
    assert "cannot load" in single_error_line(capsys, code)


def test_demo_without_its_packages(tmp_path, capsys, monkeypatch):
    import apostate.model.demo as demo

    monkeypatch.setattr(demo, "DEMO_PACKAGES", ["apostate_no_such_part"])
    code = main(["demo", "--run-dir", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")])
    assert "pip install 'apostate[demo]'" in single_error_line(capsys, code)


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


def test_bitsandbytes_8bit_is_refused_at_start(tmp_path, capsys, model_dir):
    code = main([str(model_dir), "--run-dir", str(tmp_path / "run"), "--quantization", "bnb_8bit"])
    line = single_error_line(capsys, code)
    assert "8-bit is not supported" in line and "bnb_4bit" in line
    assert not (tmp_path / "run").exists()  # refused before anything was started


def test_evaluating_without_heldout_prompts(tmp_path, capsys, model_dir):
    code = main([str(model_dir), "--run-dir", str(tmp_path / "run"), "--dtypes", "float32",
                 "--evaluate-model", str(model_dir), "--harmless.heldout-count", "0"])  # fmt: skip
    assert "no held-out prompts" in single_error_line(capsys, code)


def run_with_prompts(model_dir, tmp_path, *flags) -> int:
    return main([str(model_dir), "--run-dir", str(tmp_path / "run"), "--dtypes", "float32", *flags])


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".csv"])
def test_prompt_file_that_is_not_utf8(tmp_path, capsys, model_dir, suffix):
    path = tmp_path / f"binary{suffix}"
    path.write_bytes(b"\xff\xfe\x00bad")
    code = run_with_prompts(model_dir, tmp_path, "--harmful.source", str(path))
    line = single_error_line(capsys, code)
    assert f"prompt file {path} is not UTF-8 text" in line and "save it as UTF-8" in line


def test_folder_as_prompt_source(tmp_path, capsys, model_dir):
    folder = tmp_path / "prompts"
    folder.mkdir()
    code = run_with_prompts(model_dir, tmp_path, "--harmless.source", str(folder))
    line = single_error_line(capsys, code)
    assert f"prompt source {folder} is a folder" in line and ".txt, .jsonl or .csv file" in line


@pytest.mark.parametrize(
    "name,content,column",
    [
        ("named.csv", "id,question\n1,what?\n", "prompt"),
        ("named.jsonl", '{"question": "what?"}\n', "prompt"),
    ],
)
def test_named_column_that_does_not_exist(tmp_path, capsys, model_dir, name, content, column):
    path = tmp_path / name
    path.write_text(content)
    code = run_with_prompts(model_dir, tmp_path, "--harmful.source", str(path), "--harmful.column", column)
    line = single_error_line(capsys, code)
    assert f"{path} has no column 'prompt' (it has: " in line and "question" in line


def test_prompts_in_both_sets(tmp_path, capsys, model_dir):
    harmless, harmful = tmp_path / "harmless.txt", tmp_path / "harmful.txt"
    harmless.write_text("say hi\nshared one\nshared two\n")
    harmful.write_text("shared two\nbe rude\nshared one\n")
    code = run_with_prompts(model_dir, tmp_path, "--harmless.source", str(harmless), "--harmful.source", str(harmful))
    line = single_error_line(capsys, code)
    assert "prompt sets share 2 prompts (first: 'shared one')" in line and "remove them from one of the sets" in line


def test_config_file_that_is_not_toml(tmp_path, capsys, model_dir):
    config = tmp_path / "broken.toml"
    config.write_text("n_trials = 4\nseed = \n")
    code = main([str(model_dir), "--config", str(config)])
    line = single_error_line(capsys, code)
    assert f"config file {config} is not valid TOML" in line and "(at line 2, column 8)" in line


def test_config_file_with_an_unknown_key(tmp_path, capsys, model_dir):
    config = tmp_path / "typo.toml"
    config.write_text("[harmless]\nsorce = 'x.txt'\n")
    code = main([str(model_dir), "--config", str(config)])
    assert "harmless.sorce: unknown setting" in single_error_line(capsys, code)


def test_config_file_with_a_wrong_type(tmp_path, capsys, model_dir):
    config = tmp_path / "types.toml"
    config.write_text("n_trials = 'many'\n")
    code = main([str(model_dir), "--config", str(config)])
    line = single_error_line(capsys, code)
    assert "invalid settings: n_trials: Input should be a valid integer" in line


# (file name, content, what the error line says; {path} is the file)
BAD_PROMPT_FILES = [
    ("mixed.jsonl", '{"prompt": "a"}\n"b"\n', ["{path}:2: a JSON string, but line 1 is a JSON object"]),
    ("broken.jsonl", '{"prompt": "a"}\n\n{"prompt": oops}\n', ["{path}:3: not valid JSON"]),
    ("keys.jsonl", '{"prompt": "a"}\n{"text": "b"}\n', ["{path}:2: no key 'prompt' (it has: text)"]),
    (
        "few.txt",
        "one\ntwo\nthree\n",
        ["harmful prompt source '{path}' has 3 prompts", "lower --harmful.direction-count"],
    ),
]


@pytest.mark.parametrize(("name", "content", "expected"), BAD_PROMPT_FILES, ids=[row[0] for row in BAD_PROMPT_FILES])
def test_bad_prompt_file(tmp_path, capsys, model_dir, name, content, expected):
    path = tmp_path / name
    path.write_text(content)
    code = run_with_prompts(model_dir, tmp_path, "--harmful.source", str(path))
    line = single_error_line(capsys, code)
    assert all(part.format(path=path) in line for part in expected), line
