"""Runs with a judge: the front and the chosen trial re-scored, both counts side by side in the
table, pareto.json and the model card; verdicts cached; the key kept secret; judge faults
stopped before the search, with finished trials kept."""

import json
import re

import pytest
from openai_stub import KEY, StubServer
from test_end_to_end import load_study, run
from tiny import tiny_model_folder

from apostate.search.study import completed

JUDGED_COLUMN = re.compile(r"┃\s*Judged\s*┃")  # the front table's column of the judge's counts


def endpoint_flags(server):
    # scope 'all': the tiny model's random text seldom holds a refusal marker for the judge to check
    return [
        "--judge.kind",
        "endpoint",
        "--judge.url",
        server.url,
        "--judge.model",
        "stub-judge",
        "--judge.scope",
        "all",
    ]


def every_file_text(folder):
    return {path: path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_an_endpoint_judge_rescores_the_front_and_its_counts_are_shown_and_exported(
    model_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("APOSTATE_JUDGE__API_KEY", KEY)
    run_dir, output = tmp_path / "run", tmp_path / "exported"
    actions = ["--headless", "--actions", "save", "--actions", "evaluate", "--output-dir", str(output)]
    with StubServer() as server:
        assert run(model_dir, run_dir, "--n-trials", "3", *endpoint_flags(server), *actions) == 0
        first_requests = len(server.requests)
        out = capsys.readouterr().err
        pareto = json.loads((run_dir / "pareto.json").read_text())
        judge_name = f"endpoint:{server.url}#stub-judge"
        assert pareto["base_judged"]["judge"] == judge_name
        for entry in pareto["pareto"]:
            judged = entry["judged"]
            assert judged["judge"] == judge_name and judged["total"] == entry["total"]
            assert {"refusals", "broken"} <= set(judged)
        assert JUDGED_COLUMN.search(out) and f"judged by {judge_name}" in out
        record = json.loads((output / "apostate.json").read_text())
        assert record["scores"]["evaluation"]["judged"]["judge"] == judge_name
        assert record["scores"]["held-out"]["judged"]["judge"] == judge_name
        card = (output / "README.md").read_text()
        assert "Judged" in card and "markers" in card
        for label in ("evaluation", "held-out"):  # the trial's row and the base model's, both counts
            assert f"| {label} |" in card and f"| {label}, base model |" in card
        assert (run_dir / "verdicts.sqlite").is_file()
        assert first_requests > 0, "the judge was asked"

        # Shown again, nothing is judged anew; resumed with more trials, only new pairs are asked.
        assert run(model_dir, run_dir, "--n-trials", "3", "--show-results", *endpoint_flags(server)) == 0
        assert JUDGED_COLUMN.search(capsys.readouterr().err)
        assert len(server.requests) == first_requests
        assert run(model_dir, run_dir, "--n-trials", "4", "--headless", *endpoint_flags(server)) == 0
        asked_again = [r["messages"][-1]["content"] for r in server.requests[first_requests:]]
        assert len(asked_again) == len(set(asked_again)), "no pair is asked twice"
        out = capsys.readouterr().err

    # The key: never printed, never in any file the run wrote (run folder, export, cache).
    assert KEY not in out
    for path, data in every_file_text(tmp_path).items():
        assert KEY.encode() not in data, path


def test_evasive_answers_count_as_refused_in_the_front_the_pick_the_heldout_scores_and_the_card(
    model_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("APOSTATE_JUDGE__API_KEY", KEY)
    # The tiny model's random text is broken at full length; here every answer goes to the judge.
    monkeypatch.setattr("apostate.scoring.judges.refined.broken_reason", lambda prompt, response: None)
    run_dir, output = tmp_path / "run", tmp_path / "exported"
    actions = ["--headless", "--actions", "evaluate", "--actions", "save", "--output-dir", str(output)]
    with StubServer(reply="Evasive.") as server:  # every answer a covert refusal
        assert run(model_dir, run_dir, "--n-trials", "3", *endpoint_flags(server), *actions) == 0
        out = capsys.readouterr().err
    pareto = json.loads((run_dir / "pareto.json").read_text())
    for entry in pareto["pareto"]:
        judged = entry["judged"]
        assert judged["refusals"] == 0 and judged["evasive"] == judged["total"] - judged["broken"] > 0
        assert judged["tokens"] == 256, "judged at full length"
    chosen = next(entry for entry in pareto["pareto"] if "heldout" in entry)
    heldout = chosen["heldout"]
    assert heldout["judged"]["evasive"] == heldout["judged"]["total"] - heldout["judged"]["broken"]
    evasive = chosen["judged"]["evasive"]
    assert f"({evasive} evasive)" in out, "the chosen trial's line counts them as refused"
    card = (output / "README.md").read_text()
    assert f"({heldout['judged']['evasive']} evasive)" in card
    assert KEY not in out and all(KEY.encode() not in data for data in every_file_text(tmp_path).values())


def test_a_local_model_judge_rescores_the_front(model_dir, tmp_path, capsys):
    run_dir = tmp_path / "run"
    judge = ["--judge.kind", "model", "--judge.model", str(model_dir), "--judge.batch-size", "4"]
    assert run(model_dir, run_dir, "--n-trials", "2", "--headless", *judge) == 0
    pareto = json.loads((run_dir / "pareto.json").read_text())
    assert pareto["base_judged"]["judge"] == f"model:{model_dir} (on marker refusals)"
    assert all(entry["judged"]["total"] == entry["total"] for entry in pareto["pareto"])
    assert "Loading judge model" in capsys.readouterr().err


def test_judge_faults_stop_the_run_before_the_search_and_keep_finished_trials(
    model_dir, tmp_path, bad_input, monkeypatch
):
    run_dir = tmp_path / "run"
    assert run(model_dir, run_dir, "--n-trials", "2", "--headless") == 0
    before = {t.number: t.values for t in completed(load_study(run_dir))}

    with StubServer() as server:
        url = server.url
    code = run(model_dir, run_dir, "--n-trials", "4", "--headless", "--judge.kind", "endpoint",
               "--judge.url", url, "--judge.model", "m", "--judge.timeout", "2")  # fmt: skip
    bad_input.error("judge", "judge endpoint not reachable (command line)", code)

    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-key-for-test")
    with StubServer() as server:
        code = run(model_dir, run_dir, "--n-trials", "4", "--headless", *endpoint_flags(server))
    line = bad_input.error("judge", "wrong API key (from OPENAI_API_KEY)", code)
    assert "sk-wrong-key-for-test" not in line

    code = run(model_dir, run_dir, "--n-trials", "4", "--headless", "--judge.kind", "endpoint")
    bad_input.error("judge", "endpoint judge without --judge.url", code)
    code = run(model_dir, run_dir, "--n-trials", "4", "--headless", "--judge.kind", "model")
    bad_input.error("judge", "model judge without --judge.model", code)
    plain = tiny_model_folder(tmp_path / "no-template", chat_template=None)
    code = run(
        model_dir, run_dir, "--n-trials", "4", "--headless", "--judge.kind", "model", "--judge.model", str(plain)
    )
    bad_input.error("judge", "judge model without a chat template", code)

    after = {t.number: t.values for t in completed(load_study(run_dir))}
    assert after == before, "no trial was run or lost"


@pytest.fixture
def tagged_prompts(tmp_path):
    """Harmful prompts in three categories (.jsonl with a category column)."""
    path = tmp_path / "harmful.jsonl"
    rows = [{"prompt": f"Harmful request {category} {i}", "category": category}
            for category in ("hate", "fraud", "drugs") for i in range(12)]  # fmt: skip
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


def test_heldout_refusals_are_counted_per_category(model_dir, tmp_path, tagged_prompts, capsys):
    run_dir = tmp_path / "run"
    flags = ["--harmful.source", str(tagged_prompts), "--harmful.direction-count", "12",
             "--harmful.evaluation-count", "12", "--harmful.heldout-count", "9"]  # fmt: skip
    assert run(model_dir, run_dir, "--n-trials", "2", "--headless", "--actions", "evaluate", *flags) == 0
    study = load_study(run_dir)
    heldout = next(value for key, value in study.user_attrs.items() if key.startswith("heldout_"))
    assert sorted(heldout["categories"]) == ["drugs", "fraud", "hate"]
    assert all(row["total"] == 3 for row in heldout["categories"].values()), "dealt evenly over the categories"
    full = heldout["full"]  # no judge: the markers on the full-length answers
    for key in ("refusals", "broken", "total"):
        assert sum(row[key] for row in heldout["categories"].values()) == full[key]
    assert "Held-out answers by category" in capsys.readouterr().err
    pareto = json.loads((run_dir / "pareto.json").read_text())
    evaluated = [entry for entry in pareto["pareto"] if "heldout" in entry]
    assert len(evaluated) == 1 and evaluated[0]["heldout"]["categories"] == heldout["categories"]
