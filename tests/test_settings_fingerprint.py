"""Which settings change what a trial measures is declared on the fields; the resume fingerprint follows it."""

import json
from pathlib import Path

import pytest

from apostate.config_file import render_default_config
from apostate.errors import ApostateError
from apostate.measured import METHODS, measured, measured_for
from apostate.search.home import RunFolderHome
from apostate.settings import Settings

# Each method's default fingerprint on demo as run folders made before [directional] hold it
# (written by commit 477144a): directional's knobs at the top level, in every method's.
PINNED = json.loads((Path(__file__).parent / "data" / "fingerprints-477144a.json").read_text())
DIRECTIONAL_KNOBS = ("row_normalization", "full_normalization_rank", "search")


def settings(**values) -> Settings:
    return Settings(model="demo", config=None, **values)  # config=None: no ./apostate.toml


def old_fingerprint_of(settings, model_name: str) -> dict:
    """search.study.fingerprint_of as it was, with its hand-kept list: stored run folders hold this."""
    keys = [
        "method",
        "components",
        "orthogonalize_direction",
        "winsorization_quantile",
        "row_normalization",
        "full_normalization_rank",
        "system_prompt",
        "max_response_tokens",
        "refusal_markers",
        "response_prefix",
        "quantization",
        "chat_template",
        "kl_cutoff",
    ]
    directional = settings.directional
    data = {key: getattr(directional if key in DIRECTIONAL_KNOBS else settings, key) for key in keys}
    data["model"] = model_name
    data["harmless"] = settings.harmless.model_dump()
    data["harmful"] = settings.harmful.model_dump()
    data["search"] = directional.search.model_dump()
    if settings.method != "directional":
        data["ara"] = settings.ara.model_dump(exclude={"fit_positions"})  # added since: absent at 1
        for key in DIRECTIONAL_KNOBS:  # since [directional]: only directional runs measure them
            del data[key]
    return json.loads(json.dumps(data, default=str))


VARIANTS = [
    {},
    {"method": "ara"},
    {"method": "ara-lora", "ara": {"lora_rank": 4, "layer_start": (0.1, 0.5), "objective": "knn"}},
    {"method": "directional", "ara": {"lora_rank": 4}},
    {
        "quantization": "bnb_4bit",
        "chat_template": "{{ messages }}",
        "system_prompt": "Be brief.",
        "response_prefix": "<think></think>",
        "components": ["mlp"],
        "row_normalization": "none",
        "winsorization_quantile": 0.95,
        "search": {"direction_index": (0.2, 0.7), "per_layer_directions": False},
        "harmless": {"source": "prompts.txt", "split": "train", "heldout_count": 0},
        "harmful": {"prefix": "Q: ", "shuffle_seed": 3},
        "n_trials": 7,
        "n_startup_trials": 2,
        "run_dir": "runs/elsewhere",
    },
]


@pytest.mark.parametrize("method", METHODS)
def test_a_default_fingerprint_is_the_one_old_run_folders_hold(method):
    """Pinned: directional's is unchanged; ARA's lost directional's knobs, which it never read."""
    pinned = PINNED[method]
    new = settings(method=method).measurement_fingerprint("demo")
    if method == "directional":
        assert new == pinned
    else:
        assert new == {key: value for key, value in pinned.items() if key not in DIRECTIONAL_KNOBS}


@pytest.mark.parametrize("method", METHODS)
def test_a_study_made_before_directional_had_a_table_resumes(tmp_path, method):
    """A run folder whose study holds the old fingerprint opens with today's settings; a real
    change is still refused."""
    study = RunFolderHome(tmp_path).open(PINNED[method], measured=True, seed=0, n_startup_trials=1)
    study.ask()
    new = settings(method=method).measurement_fingerprint("demo")
    RunFolderHome(tmp_path).open(new, measured=True, seed=0, n_startup_trials=1)
    changed = settings(method=method, kl_cutoff=1.0).measurement_fingerprint("demo")
    with pytest.raises(ApostateError, match="changed: kl_cutoff"):
        RunFolderHome(tmp_path).open(changed, measured=True, seed=0, n_startup_trials=1)


def test_old_config_keys_load_into_the_directional_table(tmp_path):
    config = tmp_path / "old.toml"
    config.write_text('row_normalization = "pre"\nfull_normalization_rank = 2\n\n[search]\nmax_weight = [0.5, 1.0]\n')
    loaded = Settings(model="demo", config=config)
    assert loaded.directional.row_normalization == "pre" and loaded.directional.full_normalization_rank == 2
    assert loaded.directional.search.max_weight == (0.5, 1.0)


@pytest.mark.parametrize("values", VARIANTS)
def test_fingerprint_is_the_old_hand_kept_one(values):
    made = settings(**values)
    for model_name in ("demo", "Qwen3-0.6B"):
        new, old = made.measurement_fingerprint(model_name), old_fingerprint_of(made, model_name)
        assert new == old
        assert json.dumps(new, sort_keys=True) == json.dumps(old, sort_keys=True)


# One other value per measured setting; a field newly marked measured() needs an entry here.
CHANGES = {
    "quantization": "bnb_4bit",
    "chat_template": "{{ messages }}",
    "system_prompt": "Be brief.",
    "harmless": {"evaluation_count": 7},
    "harmful": {"source": "other.txt"},
    "max_response_tokens": 12,
    "response_prefix": "<think></think>",
    "refusal_markers": ["nope"],
    "method": "directional",
    "components": ["mlp"],
    "orthogonalize_direction": False,
    "winsorization_quantile": 0.9,
    "directional": {"row_normalization": "pre", "full_normalization_rank": 2, "search": {"max_weight": (0.5, 1.0)}},
    "ara": {"lora_rank": 4},
    "kl_cutoff": 1.0,
    "kl_tokens": 8,
    "capability_floor": {"items": 10},
}
UNMEASURED = {
    "evaluation_response_tokens": 64,
    "evaluation_kl_tokens": 8,
    "capabilities": {"items": 5},
    "model_revision": "main",
    "run_dir": "runs/x",
    "cache_dir": "/tmp/cache",
    "dtypes": ["float32"],
    "batch_size": 8,
    "max_batch_size": 16,
    "reuse_responses": False,
    "n_trials": 200,
    "n_startup_trials": 5,
    "seed": 4,
    "headless": True,
    "trial": 3,
    "actions": ["save"],
    "output_dir": "out",
}


def measured_names() -> set[str]:
    return {name for name, field in Settings.model_fields.items() if measured_for(field)}


def test_every_measured_setting_is_exercised():
    assert measured_names() == set(CHANGES)
    assert not measured_names() & set(UNMEASURED)
    assert "model" not in measured_names()  # the fingerprint's "model" is the resolved model's name
    assert measured_for(Settings.model_fields["ara"]) == ("ara", "ara-lora")
    assert measured_for(Settings.model_fields["kl_cutoff"]) == METHODS


@pytest.mark.parametrize("name", sorted(CHANGES))
def test_changing_a_measured_setting_changes_the_fingerprint(name):
    base = {"method": "ara"} if name == "ara" else {"method": "directional"} if name == "directional" else {}
    before = settings(**base).measurement_fingerprint("demo")
    after = settings(**{**base, name: CHANGES[name]}).measurement_fingerprint("demo")
    assert before != after
    keys = DIRECTIONAL_KNOBS if name == "directional" else (name,)  # spread at the top level
    assert any(before.get(key) != after.get(key) for key in keys)  # (kl_tokens: absent at its default)


@pytest.mark.parametrize("name", sorted(UNMEASURED))
@pytest.mark.parametrize("method", METHODS)
def test_changing_an_unmeasured_setting_keeps_the_fingerprint(name, method):
    before = settings(method=method).measurement_fingerprint("demo")
    assert settings(method=method, **{name: UNMEASURED[name]}).measurement_fingerprint("demo") == before


def test_directional_settings_count_only_for_directional():
    changed = {"directional": {"row_normalization": "none"}}
    for method in ("ara", "ara-lora"):
        assert settings(method=method, **changed).measurement_fingerprint("demo") == settings(
            method=method
        ).measurement_fingerprint("demo")


def test_ara_settings_count_only_for_ara_methods():
    directional = settings(method="directional")
    assert "ara" not in directional.measurement_fingerprint("demo")
    changed = {"ara": {"lora_rank": 4}}
    assert settings(method="directional", **changed).measurement_fingerprint(
        "demo"
    ) == directional.measurement_fingerprint("demo")
    assert settings(method="ara", **changed).measurement_fingerprint("demo")["ara"]["lora_rank"] == 4
    assert settings(**changed).measurement_fingerprint("demo")["ara"]["lora_rank"] == 4  # the default, ara-lora


def test_a_setting_added_later_is_in_the_fingerprint_only_away_from_its_default():
    """Studies made before kl_tokens existed measured the first token: they resume at kl_tokens = 1."""
    assert "kl_tokens" not in settings().measurement_fingerprint("demo")
    assert settings(kl_tokens=16).measurement_fingerprint("demo")["kl_tokens"] == 16
    assert "capability_floor" not in settings().measurement_fingerprint("demo")
    assert settings(capability_floor={"items": 5}).measurement_fingerprint("demo")["capability_floor"]["items"] == 5
    # Inside a method's table too: ARA studies fitted at the last position resume at fit_positions = 1.
    assert "fit_positions" not in settings().measurement_fingerprint("demo")["ara"]
    assert settings(ara={"fit_positions": 6}).measurement_fingerprint("demo")["ara"]["fit_positions"] == 6


def test_the_model_name_is_part_of_the_fingerprint():
    assert settings().measurement_fingerprint("a")["model"] == "a"
    assert settings().measurement_fingerprint("a") != settings().measurement_fingerprint("b")


def test_measured_names_only_known_methods():
    with pytest.raises(ValueError, match="unknown methods"):
        measured(0, methods=("ara", "abliterate"), description="x")


def test_default_config_marks_measured_settings():
    text = render_default_config()
    blocks = [block.splitlines() for block in text.split("\n\n")]
    for name, field in Settings.model_fields.items():
        if name in ("model", "config"):
            continue
        starts = (f"{name} =", f"# {name} =", f"[{name}]")
        # The first block naming it: top-level entries come before the tables and their fields.
        block = next(lines for lines in blocks if any(line.startswith(starts) for line in lines))
        note = any(line.startswith("# Changes what a trial measures") for line in block)
        assert note == bool(measured_for(field)), name
    assert "Changes what a trial measures (methods 'ara', 'ara-lora')" in " ".join(text.split())


def test_start_up_measured_before_directional_had_a_table_is_reused(tmp_path):
    """An ARA run folder's startup.pt, keyed by the old fingerprint, still holds for today's."""
    import torch

    from apostate.startup.measure import Startup, read_startup, write_startup

    measured = Startup(16, "", torch.zeros(2, 3), torch.zeros(2, 4), 3, [[1, 2]], {"prefix": 1.0})
    old_key = {"fingerprint": PINNED["ara-lora"], "dtype": "torch.float32", "batch_size": 16}
    write_startup(measured, old_key, tmp_path / "startup.pt")
    today = {**old_key, "fingerprint": settings().measurement_fingerprint("demo")}
    assert read_startup(tmp_path / "startup.pt", today).base_refusals == 3
    changed = {**old_key, "fingerprint": settings(kl_cutoff=1.0).measurement_fingerprint("demo")}
    assert read_startup(tmp_path / "startup.pt", changed) is None
