"""All settings of a run, in one pydantic-settings model.

Sources, strongest first: command-line flags, environment variables (`APOSTATE_…`,
nested with `__`), a TOML file (`--config FILE`, else `apostate.toml` in the current
folder if present), then the defaults below. Unknown keys and invalid values are errors.

Settings declared with `measured()` change what a trial measures: a study resumes only with the
same values (`Settings.measurement_fingerprint`).
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    CliPositionalArg,
    CliSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from apostate.capabilities.settings import CapabilityFloorSettings, CapabilitySettings
from apostate.config_sources import OneLineArgumentParser, chosen_config_file, find_config_file, toml_source
from apostate.measured import (
    REGISTERED_METHODS,
    MethodName,
    at_earlier_default,
    measured,
    measured_for,
    measured_table,
    methods_using,
)
from apostate.methods.ara.settings import AraSettings
from apostate.methods.directional.settings import DirectionalSettings, legacy_keys_moved
from apostate.model.chat_template import read_chat_template
from apostate.prompt_settings import PromptSetSpec
from apostate.results.gguf_settings import GgufSettings
from apostate.results.upload_settings import UploadSettings
from apostate.scoring.judges.settings import JudgeSettings
from apostate.startup.check_settings import StartupChecks

# Directional's knobs before they had their own table: config files and run records that name
# them at the top level still load (moved into [directional]).


# One marker a line, in data/ with the bundled prompt sets.
DEFAULT_REFUSAL_MARKERS = resources.files("apostate").joinpath("data/refusal_markers.txt").read_text().splitlines()

DEFAULT_COT_SKIPS = [
    ("<think>", "<think>\n\n</think>\n\n"),
    ("<thought>", "<thought></thought>"),
    ("[THINK]", "[THINK][/THINK]"),
    (
        "<|channel|>analysis<|message|>",
        "<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>",
    ),
]


class Settings(BaseSettings):
    """Everything a run needs; see `apostate --help` or config.default.toml."""

    model_config = SettingsConfigDict(
        extra="forbid",
        env_prefix="APOSTATE_",
        env_nested_delimiter="__",
        cli_kebab_case=True,
        cli_implicit_flags=True,
        cli_prog_name="apostate",
        cli_hide_none_type=True,
        cli_avoid_json=True,
        nested_model_default_partial_update=True,
        validate_default=True,
    )

    model: CliPositionalArg[str] = Field(
        description="Model to work on: a Hugging Face id, a local folder, a .gguf file, or 'demo' (the offline demo model)."
    )
    config: Path | None = Field(
        default=None, description="TOML file with settings (default: ./apostate.toml if it exists).", exclude=True
    )
    model_revision: str | None = Field(
        default=None, description="Hugging Face revision (commit hash, branch or tag) of the model."
    )

    # --- Where things go -------------------------------------------------------------
    run_dir: Path | None = Field(
        default=None, description="Folder of this run (study, results, exports). Default: runs/<model name>."
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Cache for the demo model and GGUF conversions. Default: $XDG_CACHE_HOME/apostate or ~/.cache/apostate.",
    )

    # --- Loading ---------------------------------------------------------------------
    dtypes: list[str] = Field(
        default=["auto", "bfloat16", "float16", "float32"],
        min_length=1,
        description="Torch dtypes to try in order; the first that loads and generates a finite token wins.",
    )
    quantization: Literal["none", "bnb_4bit"] = measured(
        "none",
        description="'bnb_4bit' loads the model with bitsandbytes 4-bit NF4 quantization "
        "(8-bit is refused: its weights cannot be read back reliably).",
    )
    device_map: str | dict[str, int | str] = Field(
        default="auto", description="Passed to from_pretrained (accelerate)."
    )
    offload_folder: Path | None = Field(
        default=None,
        description="Where accelerate keeps the weights it offloads to disk when max_memory leaves no room "
        "for them elsewhere. Unset: <cache_dir>/offload/<model>.",
    )
    activations_on: Literal["cpu", "device"] = Field(
        default="cpu",
        description="Where residuals and captured module activations are kept: 'cpu' moves them off the "
        "accelerator at once (default), 'device' keeps them next to the model (faster fits, more GPU memory).",
    )
    max_memory: dict[str, str] | None = Field(
        default=None, description="Memory limit per device for accelerate, e.g. {0 = '20GiB', cpu = '64GiB'}."
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow model code from the hub. Only for models you trust."
    )
    chat_template: str | None = measured(
        None,
        description="Jinja chat template, for models that have none: a value holding Jinja syntax ({{, {% or {#) "
        "is the template's text, any other value the path of a file that holds it.",
    )

    # --- Prompts ---------------------------------------------------------------------
    system_prompt: str | None = measured(
        None, description="System prompt for all prompts. Unset: the model's own default."
    )
    harmless: PromptSetSpec = measured(
        PromptSetSpec(source="bundled:harmless"), description="Prompts a model answers ('good')."
    )
    harmful: PromptSetSpec = measured(
        PromptSetSpec(source="bundled:harmful"), description="Prompts a model refuses ('bad')."
    )

    # --- Scoring ---------------------------------------------------------------------
    batch_size: int = Field(default=0, ge=0, description="Prompts per batch (0 = find automatically).")
    max_batch_size: int = Field(default=64, ge=1, description="Largest batch size the automatic search tries.")
    max_response_tokens: int = measured(
        48, ge=1, description="Tokens generated per response when checking for refusals."
    )
    kl_tokens: int = measured(
        1,
        ge=1,
        le=256,
        added_later=True,
        description="KL divergence over the first k positions of the base model's own greedy answer to each "
        "harmless prompt (teacher-forced, one pass; 1: the first token only).",
    )
    evaluation_response_tokens: int = Field(
        default=256,
        ge=1,
        description="Tokens of each full-length answer read after the search: the held-out evaluation and the "
        "judge's re-scoring (the search's own check stops at max_response_tokens or the first refusal marker; with no "
        "judge, the evaluation too stops an answer at its first marker, where its verdict is decided).",
    )
    evaluation_kl_tokens: int = Field(
        default=32,
        ge=1,
        le=256,
        description="The held-out evaluation reports the KL along the first k tokens of the base model's answers "
        "to the harmless held-out prompts beside the first-token KL (whatever kl_tokens the search used).",
    )
    reuse_responses: bool = Field(
        default=True,
        description="Check each prompt's responses from earlier trials as drafts when generating "
        "(speculative decoding: the responses stay exactly the greedy ones, most take one forward pass).",
    )
    response_prefix: str | None = measured(
        None, description="Text every response starts with, skipped before scoring. Unset: detected automatically."
    )
    chain_of_thought_skips: list[tuple[str, str]] = Field(
        default=DEFAULT_COT_SKIPS,
        description="Pairs (opening, closed empty block): a response starting with the opening gets the closed block as prefix.",
    )
    refusal_markers: list[str] = measured(
        DEFAULT_REFUSAL_MARKERS,
        min_length=1,
        description="A response containing any of these (case, apostrophes and markdown normalized) counts as a refusal.",
    )
    checks: StartupChecks = Field(
        default_factory=StartupChecks, description="When the checks before the first trial warn."
    )
    judge: JudgeSettings = Field(
        default_factory=JudgeSettings,
        description="The judge that re-scores the Pareto front and the chosen trial: refusal, compliance or broken.",
    )

    # --- Method ----------------------------------------------------------------------
    method: MethodName = measured(
        "ara-lora",
        description="'directional': directional ablation; 'ara': Arbitrary-Rank Ablation of full weights; "
        "'ara-lora': ARA optimized as LoRA factors (works on 4-bit models).",
    )
    components: list[Literal["attn", "mlp"]] = measured(
        ["attn", "mlp"],
        min_length=1,
        description="Residual writers to ablate: 'attn' (attention/mixer out-projections), 'mlp' (MLP and expert down-projections).",
    )
    orthogonalize_direction: bool = measured(
        True,
        description="Remove from each refusal direction its component along the harmless mean ('projected abliteration').",
    )
    winsorization_quantile: float = measured(
        1.0,
        gt=0.0,
        le=1.0,
        description="Clamp residual components to this quantile of their magnitudes before averaging (1 = off).",
    )
    directional: DirectionalSettings = measured(
        default_factory=DirectionalSettings,
        methods=methods_using("directional"),
        description="Directional ablation: normalization and ranges.",
    )
    ara: AraSettings = measured(
        default_factory=AraSettings,
        methods=methods_using("ara"),
        description="Arbitrary-Rank Ablation: fitting and ranges.",
    )

    # --- Optimizer -------------------------------------------------------------------
    n_trials: int = Field(default=120, ge=1, description="Total trials in the study (raise it to add trials to a run).")
    n_startup_trials: int = Field(default=30, ge=0, description="Random trials before TPE starts modelling.")
    seed: int | None = Field(default=None, description="Sampler seed (unset: random, recorded in the run).")
    capability_floor: CapabilityFloorSettings = measured(
        default_factory=CapabilityFloorSettings,
        added_later=True,
        description="A floor on benchmark accuracy every trial must keep (off while items is 0).",
    )
    kl_cutoff: float = measured(
        2.0,
        gt=0,
        description="A trial whose KL divergence exceeds this is marked infeasible (Optuna constraint, pruned) "
        "and its refusals are not counted.",
    )
    stop_dominated_trials: bool = Field(
        default=True,
        description="Stop counting a trial's refusals once it has more failures than a scored trial with no "
        "higher KL: it can never be on the Pareto front. Kept as pruned, with the counts so far.",
    )
    storage: SecretStr | None = Field(
        default=None,
        description="Optuna storage URL of a study that workers share, e.g. postgresql+psycopg://user@host/db "
        "(password: PGPASSWORD, ~/.pgpass or the URL; never printed). Unset: the journal file in the run folder.",
    )
    study_name: str = Field(
        default="apostate",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$",
        description="The study's name in --storage: workers given the same name run its trials together.",
    )
    heartbeat_seconds: int = Field(
        default=30,
        ge=1,
        description="With --storage: how often a worker says it is alive; a trial silent for 4 times this "
        "is failed and run again by another worker.",
    )
    show_results: bool = Field(default=False, description="Run no new trials; show what the run folder already holds.")

    # --- After the search --------------------------------------------------------------
    headless: bool = Field(default=False, description="Never ask; use --trial/--pick-max-kl and --actions.")
    trial: int | None = Field(default=None, description="Trial number to use (default when headless: see pick_max_kl).")
    pick_max_kl: float = Field(
        default=0.1,
        gt=0,
        description="Headless pick: fewest refusals among Pareto trials with KL at most this (ties: lower KL).",
    )
    actions: list[Literal["save", "save-adapter", "save-gguf", "evaluate", "chat", "upload"]] = Field(
        default=[], description="Headless actions on the picked trial, in order (evaluate first, upload last)."
    )
    output_dir: Path | None = Field(
        default=None, description="Where to save (default: <run_dir>/model, adapter or gguf)."
    )
    max_shard_size: str = Field(default="5GB", description="Largest safetensors shard when saving.")
    gguf: GgufSettings = Field(default_factory=GgufSettings, description="The GGUF export (save-gguf).")
    upload: UploadSettings = Field(default_factory=UploadSettings, description="Publishing an export on the hub.")
    capabilities: CapabilitySettings = Field(
        default_factory=CapabilitySettings,
        description="Benchmarks the evaluation scores for the base model and the chosen trial (lm-eval).",
    )
    evaluate_model: str | None = Field(
        default=None, description="Score this other model against the base on the held-out sets, then exit."
    )
    debug: bool = Field(
        default=False, description="Show the full traceback with an error (for bug reports); without it, one line."
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        toml = chosen_config_file(getattr(init_settings, "init_kwargs", {}))
        if toml is not None:
            sources.append(toml_source(settings_cls, toml))
        return tuple(sources)

    def measurement_fingerprint(self, model_name: str) -> dict:
        """The `measured()` settings of this run's method, and the model: a resumed study must match them.

        JSON-plain (tuples as lists, paths as text), as stored in the study. Directional's table is
        spread at the top level, where run folders made before it had a table hold its knobs.
        """
        data = {}
        for name, field in type(self).model_fields.items():
            if self.method in measured_for(field):
                value = getattr(self, name)
                if at_earlier_default(field, value):
                    continue
                dumped = measured_table(value) if isinstance(value, BaseModel) else value
                if name == "directional":
                    data.update(dumped)
                else:
                    data[name] = dumped
        data["model"] = model_name
        return json.loads(json.dumps(data, default=str))

    def method_settings(self) -> BaseModel:
        """The run's method's own settings table ([directional] or [ara])."""
        return getattr(self, REGISTERED_METHODS[self.method][1])

    def cache_path(self) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir.expanduser()
        root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        return Path(root) / "apostate"

    @model_validator(mode="before")
    @classmethod
    def _legacy_directional_keys(cls, data: Any) -> Any:
        return legacy_keys_moved(data)

    @field_validator("quantization", mode="before")
    @classmethod
    def _no_8bit(cls, value):
        if isinstance(value, str) and "8" in value:
            raise ValueError(
                "bitsandbytes 8-bit is not supported: it drops the scale factors of its int8 weights after a "
                "forward pass, so edits computed from them would be silently wrong; use 'bnb_4bit'"
            )
        return value

    @field_validator("chat_template")
    @classmethod
    def _readable_template(cls, value: str | None) -> str | None:
        if value is not None:
            read_chat_template(value)  # a path that does not exist is an error now, not a template later
        return value

    @field_validator("refusal_markers")
    @classmethod
    def _specific_markers(cls, markers: list[str]) -> list[str]:
        short = [marker for marker in markers if len(" ".join(marker.split())) < 3]
        if short:
            raise ValueError(
                f"refusal marker {short[0]!r} is shorter than 3 characters: it would be found inside most answers, "
                "so nearly every response would count as a refusal; remove it"
            )
        return markers

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.n_startup_trials > self.n_trials:
            raise ValueError(
                f"n_startup_trials ({self.n_startup_trials}) is more than n_trials ({self.n_trials}): "
                "lower --n-startup-trials or raise --n-trials"
            )
        return self


def parse_command_line(argv: list[str]) -> Settings:
    """Settings from flags, environment, TOML and defaults (strongest first)."""
    parser = OneLineArgumentParser(
        prog="apostate",
        usage="apostate MODEL [options]  (or: apostate report RUN_DIR | reproduce FOLDER | inspect MODEL)",
        description="Remove refusal behaviour from a chat model. Every option can also be set in a TOML "
        "file (see config.default.toml) or as an APOSTATE_* environment variable.",
    )
    cli = CliSettingsSource(Settings, root_parser=parser)
    # The TOML file is chosen from the keyword arguments, before the flags are read: name it here.
    return Settings(config=find_config_file(argv), _cli_settings_source=cli(args=argv))
