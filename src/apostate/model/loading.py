"""Load a model and its tokenizer: dtype fallback chain, optional 4-bit, chat-template check."""

from __future__ import annotations

import gc
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from apostate.errors import ApostateError, first_line
from apostate.model.chat_template import read_chat_template
from apostate.model.checkpoint_pages import releasing_checkpoint_pages
from apostate.model.offload import first_real_device
from apostate.model.sources import ModelSource
from apostate.progress import console
from apostate.settings import Settings

# What a dtype that does not work raises: from_pretrained or the test generation refusing it
# (RuntimeError: an op not implemented for the dtype on this device; TypeError/ValueError: a dtype
# the model or its quantizer rejects, or non-finite test logits), or running out of memory.
# Anything else is a bug and surfaces as itself.
DTYPE_FAILURES = (torch.OutOfMemoryError, RuntimeError, TypeError, ValueError, NotImplementedError)


@dataclass
class LoadedModel:
    """A model ready for trials, with what it was loaded from."""

    model: torch.nn.Module
    tokenizer: object
    source: ModelSource
    dtype: torch.dtype
    quantized: bool

    @property
    def device(self) -> torch.device:
        return first_real_device(self.model)


def load_tokenizer(source: ModelSource, settings: Settings):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source.location, revision=source.revision, trust_remote_code=settings.trust_remote_code
        )
    except Exception as error:
        raise ApostateError(f"cannot load the tokenizer of '{source.name}': {_reason(error)}; {_fix(source)}") from None
    if settings.chat_template is not None:
        tokenizer.chat_template = read_chat_template(settings.chat_template)
    if not getattr(tokenizer, "chat_template", None):
        raise ApostateError(
            f"model '{source.name}' has no chat template; give one with --chat-template (text or a .jinja file)"
        )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"  # the last prompt token must sit at position -1
    return tokenizer


def load_model(source: ModelSource, settings: Settings, tokenizer=None) -> LoadedModel:
    """Try each dtype in turn; keep the first that loads and generates a finite first token.
    (`check_model` first reads the config: a missing model is one line there, before any work.)"""
    tokenizer = tokenizer or load_tokenizer(source, settings)
    failures = []
    for dtype_name in settings.dtypes:
        console.print(f"* Trying dtype [bold]{dtype_name}[/]... ", end="")
        try:
            model = _from_pretrained(source, settings, dtype_name)
            _test_generation(model, tokenizer)
        except ApostateError:
            console.print("[red]failed[/]")  # ends the line before the error line
            raise
        except DTYPE_FAILURES as error:
            failures.append(
                f"{dtype_name}: "
                + ("out of memory" if isinstance(error, torch.OutOfMemoryError) else first_line(error))
            )
        else:
            console.print("[green]ok[/]")
            _contiguous_head_input(model)
            model.eval()
            model.requires_grad_(False)
            dtype = next(p.dtype for p in model.parameters() if p.dtype.is_floating_point)
            return LoadedModel(model, tokenizer, source, dtype, settings.quantization != "none")
        console.print(f"[yellow]failed[/] ({failures[-1]})")
        model = None
        gc.collect()
    raise ApostateError(f"could not load '{source.name}' with any dtype: " + "; ".join(failures))


def check_model(source: ModelSource, settings: Settings, interactive: bool) -> Settings:
    """Read the model's config once before anything is loaded: one clear line when it cannot be
    found (offline, typo, gated); the settings to load it with otherwise.

    A model that comes with its own Python code loads only with --trust-remote-code, or when the
    user says yes when asked (interactive runs only)."""
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(
            source.location, revision=source.revision, trust_remote_code=settings.trust_remote_code
        )
        return settings
    except Exception as error:
        if settings.trust_remote_code or "trust_remote_code" not in str(error):
            raise ApostateError(f"cannot load model '{source.name}': {_reason(error)}; {_fix(source)}") from None
    what = f"model '{source.name}' comes with its own Python code, which loading it would run"
    if not interactive:
        raise ApostateError(f"{what}; read that code, and pass --trust-remote-code only if you trust its author")
    import questionary

    if not questionary.confirm(f"The {what}. Run it? (only if you trust its author)", default=False).ask():
        raise ApostateError(f"{what}, and you declined; nothing was run")
    return settings.model_copy(update={"trust_remote_code": True})


def _reason(error: BaseException) -> str:
    return first_line(error).rstrip(".")


def _fix(source: ModelSource) -> str:
    """What to do when a model's files cannot be read."""
    if source.is_local:
        return "check that the folder holds a complete model"
    return (
        "check the model id and the network (a gated model needs HF_TOKEN or `hf auth login`), or give a local folder"
    )


def _from_pretrained(source: ModelSource, settings: Settings, dtype_name: str):
    from transformers import AutoModelForCausalLM

    dtype = dtype_name if dtype_name == "auto" else getattr(torch, dtype_name, None)
    if dtype is None or (dtype != "auto" and not isinstance(dtype, torch.dtype)):
        raise ApostateError(f"'{dtype_name}' in dtypes is not a torch dtype")
    kwargs = dict(
        dtype=dtype,
        device_map=settings.device_map,
        offload_folder=str(settings.offload_folder or settings.cache_path() / "offload" / source.run_name),
        revision=source.revision,
        trust_remote_code=settings.trust_remote_code,
        use_safetensors=True,  # pickled .bin weights can run code when read: never loaded
    )
    if settings.max_memory:
        kwargs["max_memory"] = {_device_key(k): v for k, v in settings.max_memory.items()}
    if settings.quantization == "bnb_4bit":
        kwargs["quantization_config"] = _bnb_4bit_config(dtype)
    try:
        with releasing_checkpoint_pages(converting=_converts(source, dtype, settings)):
            return AutoModelForCausalLM.from_pretrained(source.location, **kwargs)
    except (OSError, SafetensorError) as error:  # missing or damaged weight files: no dtype would help
        folder = Path(source.location)
        shard = _unreadable_shard(folder) if source.is_local else None
        where = f"{shard} is damaged or cut short" if shard else first_line(error)
        fix = "download or convert the model again"
        if source.is_local and not any(folder.glob("*.safetensors")):
            pickled = any(folder.glob("*.bin")) or any(folder.glob("*.pt"))
            where = f"folder {folder} has no safetensors weight files" + (
                " (only pickled .bin/.pt ones, which apostate never loads: reading them can run code)"
                if pickled
                else ""
            )
            fix = "convert the weights to safetensors" if pickled else fix
        raise ApostateError(f"cannot read the weights of '{source.name}': {where}; {fix}") from None


def _converts(source: ModelSource, dtype, settings: Settings) -> bool:
    """Whether loading casts or quantizes the checkpoint (True where its dtype is unknown)."""
    if settings.quantization != "none":
        return True
    if dtype == "auto":
        return False
    shards = sorted(Path(source.location).glob("*.safetensors")) if source.is_local else []
    try:
        with safe_open(shards[0], framework="pt") as shard:  # reads the header only
            stored = Counter(shard.get_slice(name).get_dtype() for name in shard.keys())
        return stored.most_common(1)[0][0] != _SAFETENSORS_DTYPES.get(dtype)
    except (IndexError, SafetensorError, OSError):
        return True


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _unreadable_shard(folder: Path) -> Path | None:
    """The first safetensors file of a model folder whose header or data does not hold together."""
    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(path, framework="pt") as shard:
                for name in shard.keys():
                    shard.get_slice(name)
        except (SafetensorError, OSError):
            return path
    return None


def _contiguous_head_input(model) -> None:
    """Hand the output projection contiguous rows.

    With `logits_to_keep`, the projection gets a strided slice of the hidden states, and
    `F.linear` then runs a batched matmul over a broadcast weight: 0.25-0.3 s instead of
    0.04-0.07 s for 16 rows of the demo model on a CPU, on every prompt pass.
    """
    head = model.get_output_embeddings()
    if head is not None:
        head.register_forward_pre_hook(lambda _module, args: (args[0].contiguous(), *args[1:]) if args else None)


def _bnb_4bit_config(dtype):
    from transformers import BitsAndBytesConfig

    compute = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def _test_generation(model, tokenizer) -> None:
    """One greedy token from a short chat; non-finite logits mean the dtype does not work."""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hello"}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(first_real_device(model))
    with torch.inference_mode():
        logits = model(**inputs).logits[0, -1]
    if not torch.isfinite(logits).all():
        raise ValueError("the test generation produced non-finite logits")


def _device_key(key: str) -> int | str:
    return int(key) if key.isdigit() else key
