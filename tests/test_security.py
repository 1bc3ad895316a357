"""Security: model code runs only when asked, a hub token never leaks, and no model name makes
apostate write outside its folders."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import SMALL, tiny_model_folder

from apostate.cli import main
from apostate.commands.run import run_dir_for
from apostate.model.loading import check_model
from apostate.model.sources import ModelSource
from apostate.settings import parse_command_line

CUSTOM_CODE = """
from pathlib import Path
Path(__file__).with_name("code-ran.txt").write_text("the model's own code ran")
from transformers import PretrainedConfig


class CustomConfig(PretrainedConfig):
    model_type = "apostate-custom"
"""


@pytest.fixture
def model_with_code(tmp_path):
    """A model folder whose config needs its own Python code (auto_map), which marks when it runs."""
    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(
        '{"model_type": "apostate-custom", "auto_map": {"AutoConfig": "configuration_custom.CustomConfig"}}'
    )
    (folder / "configuration_custom.py").write_text(CUSTOM_CODE)
    return folder


def test_model_code_is_refused_headless_without_the_flag(model_with_code, tmp_path, bad_input):
    code = main([str(model_with_code), "--run-dir", str(tmp_path / "run"), "--headless"])
    line = bad_input.error("security", "a model that needs its own code, headless, no --trust-remote-code", code)
    assert "comes with its own Python code" in line and "pass --trust-remote-code only if you trust" in line
    assert not (model_with_code / "code-ran.txt").exists()


def test_model_code_is_asked_about_in_interactive_runs(model_with_code, tmp_path, monkeypatch, bad_input):
    import questionary

    asked = []

    class Answer:
        def __init__(self, value):
            self.value = value

        def ask(self):
            return self.value

    def confirm(question, default):
        asked.append((question, default))
        return Answer(answers.pop(0))

    answers = [False, True]
    monkeypatch.setattr(questionary, "confirm", confirm)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True)
    code = main([str(model_with_code), "--run-dir", str(tmp_path / "run")])
    line = bad_input.error("security", "a model that needs its own code, declined when asked", code)
    assert "and you declined; nothing was run" in line
    assert not (model_with_code / "code-ran.txt").exists()
    assert asked[0][1] is False and str(model_with_code) in asked[0][0]  # "no" unless the user says yes

    settings = parse_command_line([str(model_with_code)])
    source = ModelSource(str(model_with_code), str(model_with_code))
    assert not settings.trust_remote_code
    assert check_model(source, settings, interactive=True).trust_remote_code  # said yes
    assert len(asked) == 2


def test_a_model_without_code_is_never_asked_about(tmp_path, monkeypatch):
    import questionary

    monkeypatch.setattr(questionary, "confirm", lambda *a, **k: pytest.fail("asked without a reason"))
    folder = tiny_model_folder(tmp_path / "tiny", layers=1)
    settings = parse_command_line([str(folder)])
    assert check_model(ModelSource(str(folder), str(folder)), settings, True) is settings


@pytest.mark.parametrize(
    "name", ["..", ".", "../..", "../../etc", "/", "/tmp/../..", "x/../../..", "...gguf", "../.hidden", "~/.."]
)
def test_no_model_name_makes_a_run_folder_outside_runs(name):
    run_dir = run_dir_for(parse_command_line(["demo"]), ModelSource(name, name))
    assert run_dir.parent == Path("runs") and run_dir.name not in ("", ".", "..")
    assert not run_dir.name.startswith(".") and "/" not in run_dir.name


def test_a_hub_token_in_the_environment_is_never_written_or_printed(tmp_path):
    marker = "hf_apostateMarkerToken0123456789abcdefXYZ"
    folder = tiny_model_folder(tmp_path / "tiny")
    env = dict(os.environ, HF_TOKEN=marker, HUGGING_FACE_HUB_TOKEN=marker, APOSTATE_DEBUG="1")
    run_dir, adapter_dir = tmp_path / "run", tmp_path / "adapter"
    commands = [
        [*SMALL, "--n-trials", "2", "--headless", "--actions", "save", "--actions", "evaluate"],
        [*SMALL, "--n-trials", "2", "--headless", "--actions", "save-adapter", "--output-dir", str(adapter_dir)],
        [*SMALL, "--n-trials", "2", "--show-results"],
        [*SMALL, "--n-trials", "2", "--kl-cutoff", "1"],  # an error, with --debug's traceback
    ]
    output = ""
    for flags in commands:
        done = subprocess.run(
            [sys.executable, "-m", "apostate", str(folder), "--run-dir", str(run_dir), *flags],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        output += done.stdout + done.stderr
    assert "Pareto front" in output and "Traceback" in output  # the commands did run, the last one failed
    assert marker not in output
    written = [path for root in (run_dir, adapter_dir) for path in root.rglob("*") if path.is_file()]
    assert any(path.suffix == ".safetensors" for path in written) and len(written) > 10
    assert [path for path in written if marker.encode() in path.read_bytes()] == []
