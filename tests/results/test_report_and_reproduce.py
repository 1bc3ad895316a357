"""What a finished run leaves for people: the HTML report (rebuilt from the run folder alone), the
model card, and reproduce.json, which `apostate reproduce` turns back into the same weights."""

import json
import re
import shutil
import subprocess
import sys

import pytest
import yaml
from exports import hashes
from tiny import SMALL

from apostate.cli import main
from apostate.model.identity import _gguf_model_name
from apostate.search.reading import load_run_study

PICTURES = {"front.png", "scores.png", "edit.png", "progress.png", "phases.png"}


@pytest.fixture(scope="module")
def finished(model_dir, tmp_path_factory):
    """A headless run that evaluates and saves its pick, on a copy of the tiny model whose card
    names a base model and a license."""
    root = tmp_path_factory.mktemp("finished")
    base = root / "base"
    shutil.copytree(model_dir, base)
    (base / "README.md").write_text("---\nlicense: mit\nbase_model: example-org/tiny-base\n---\n# tiny\n")
    run_dir, output = root / "run", root / "model"
    flags = [*SMALL, "--n-trials", "3", "--headless", "--actions", "save,evaluate", "--output-dir", str(output)]
    assert main([str(base), "--run-dir", str(run_dir), *flags]) == 0
    return run_dir, output


def test_a_finished_run_leaves_a_self_contained_report(finished):
    run_dir, _ = finished
    folder = run_dir / "report"
    assert PICTURES <= {p.name for p in folder.iterdir()}
    html = (folder / "index.html").read_text()
    assert html.count('src="data:image/png;base64,') == len(PICTURES)
    assert not re.search(r'(src|href)="(https?:)?//', html), "the page must open without a network"
    chosen = load_run_study(run_dir).user_attrs["chosen"]
    assert f"trial {chosen['number']}" in html
    sides = {pair["side"] for pair in chosen["samples"]}
    assert sides == {"harmless", "harmful"} and all(pair["base"] and pair["edited"] for pair in chosen["samples"])
    assert any(norm > 0 for norms in chosen["edit_norms"].values() for norm in norms)
    assert "held-out" in html and "Base model" in html


def test_the_phase_table_times_each_action_of_the_chosen_trial(finished):
    """Evaluation first, then the save: each its own phase, after the report's samples."""
    run_dir, _ = finished
    names = [phase["name"] for phase in json.loads((run_dir / "phases.json").read_text())["phases"]]
    acting = [name for name in names if name.startswith("chosen trial")]
    assert acting == ["chosen trial: report samples", "chosen trial: evaluate", "chosen trial: save"]


def test_the_report_is_rebuilt_from_the_run_folder_without_loading_a_model(finished, tmp_path, monkeypatch):
    run_dir, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    shutil.rmtree(copy / "report")
    import transformers

    def no_model(*args, **kwargs):
        raise AssertionError("the report loaded a model")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_model)
    assert main(["report", str(copy)]) == 0
    assert PICTURES <= {p.name for p in (copy / "report").iterdir()}
    rebuilt = (copy / "report" / "index.html").read_text()
    original = (run_dir / "report" / "index.html").read_text()
    strip = re.compile(r"base64,[A-Za-z0-9+/=]+")  # the PNGs' bytes may differ; the text may not
    assert strip.sub("", rebuilt) == strip.sub("", original)


def test_the_model_card_follows_the_hub_conventions_and_carries_every_score(finished):
    _, output = finished
    card = (output / "README.md").read_text()
    header = yaml.safe_load(card.split("---")[1])
    assert header["base_model"] == "example-org/tiny-base" and header["license"] == "mit"
    assert header["library_name"] == "transformers" and "abliterated" in header["tags"]
    for row in ("| evaluation |", "| evaluation, base model |", "| held-out |", "| held-out, base model |"):
        assert row in card
    assert "apostate reproduce reproduce.json" in card
    versions = json.loads((output / "reproduce.json").read_text())["versions"]
    assert f"transformers=={versions['transformers']}" in card and f"torch=={versions['torch']}" in card


def test_reproduce_rebuilds_the_same_weights_and_names_a_changed_setting(finished, tmp_path, capsys):
    _, output = finished
    record = json.loads((output / "reproduce.json").read_text())
    assert set(record["files_sha256"]) == {"model.safetensors"}
    assert record["startup"]["batch_size"] == 8 and len(record["prompts_sha256"]) == 6

    rebuilt = tmp_path / "rebuilt"
    assert main(["reproduce", str(output), "--output-dir", str(rebuilt)]) == 0
    assert "Reproduced" in capsys.readouterr().err
    assert hashes(rebuilt)["model.safetensors"] == hashes(output)["model.safetensors"]

    changed = tmp_path / "changed"
    assert main(["reproduce", str(output / "reproduce.json"), "--output-dir", str(changed),
                 "--harmful.direction-count", "10"]) == 1  # fmt: skip
    said = capsys.readouterr().err
    assert "NO" in said and "setting harmful.direction_count: 12 -> 10" in said
    assert "prompts harmful/direction differ" in said


def test_reproduce_and_report_refuse_what_is_not_theirs_in_one_line(tmp_path, bad_input):
    (tmp_path / "empty").mkdir()
    code = main(["reproduce", str(tmp_path / "empty")])
    assert "has no reproduce.json" in bad_input.error("reproduce", "a folder without reproduce.json", code)
    (tmp_path / "bad.json").write_text("{not json")
    code = main(["reproduce", str(tmp_path / "bad.json")])
    assert "not valid JSON" in bad_input.error("reproduce", "a reproduce file that is not JSON", code)
    code = main(["report", str(tmp_path / "empty")])
    assert "not an apostate run folder" in bad_input.error("report", "a folder that is not a run folder", code)


def test_output_to_a_pipe_is_plain_lines(model_dir, tmp_path):
    """No colour codes, no cursor movement, no progress-bar redraws when output is not a terminal."""
    command = [sys.executable, "-m", "apostate", str(model_dir), "--run-dir", str(tmp_path / "run"), *SMALL,
               "--n-trials", "2", "--headless", "--actions", "evaluate"]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "Trial   1" in output and "Report:" in output
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", output), "control characters in piped output"


def test_a_gguf_files_model_name_comes_from_its_metadata():
    fields = {"general.basename": "Qwen2.5-Coder", "general.size_label": "1.5B", "general.finetune": "Instruct-GGUF"}
    assert _gguf_model_name(fields) == "Qwen2.5-Coder-1.5B-Instruct"
    assert _gguf_model_name({"general.name": "Some Model"}) == "Some Model"


def test_reproduce_rebuilds_an_ara_lora_adapter_from_recaptured_activations(model_dir, tmp_path, capsys):
    """ARA fits each trial to captured module activations, which reproduce captures again."""
    output = tmp_path / "adapter"
    flags = [*SMALL, "--method", "ara-lora", "--n-trials", "2", "--headless", "--actions", "save-adapter"]
    assert main([str(model_dir), "--run-dir", str(tmp_path / "run"), *flags, "--output-dir", str(output)]) == 0
    record = json.loads((output / "reproduce.json").read_text())
    assert record["export"] == "adapter" and set(record["files_sha256"]) == {"adapter_model.safetensors"}
    assert yaml.safe_load((output / "README.md").read_text().split("---")[1])["library_name"] == "peft"
    assert main(["reproduce", str(output), "--output-dir", str(tmp_path / "again")]) == 0
    assert "Reproduced" in capsys.readouterr().err
