"""Shared by the export tests: run to a saved trial, and re-score the saved folder with plain transformers."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from apostate.cli import main
from apostate.decoding import PromptSet
from apostate.prompts import Texts, load_prompt_splits
from apostate.scoring.scorer import kl_divergence
from apostate.settings import parse_command_line


def hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under `folder`, by path within it."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def run_and_save(model: str, run_dir, output, flags: list[str], *selection: str) -> int:
    """A headless run that saves the selected trial's merged model to `output`."""
    return main([model, "--run-dir", str(run_dir), *flags, "--headless", *selection, "--actions", "save",
                 "--output-dir", str(output)])  # fmt: skip


def exported_kl(base_folder, output, run_dir, flags: list[str], subset: str = "evaluation") -> float:
    """KL of the exported model against the base on the run's harmless prompts, both loaded plainly."""
    tokenizer = AutoTokenizer.from_pretrained(output, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(output, dtype=torch.float32)
    settings = parse_command_line([str(base_folder), *flags])
    prefix = torch.load(run_dir / "startup.pt", weights_only=True)["startup"]["response_prefix"]
    texts = Texts(tokenizer, settings, load_prompt_splits(settings), prefix).of("harmless", subset)
    prompts = PromptSet(tokenizer, texts, 8, "cpu")
    return kl_divergence(prompts.first_token_logprobs(base), prompts.first_token_logprobs(exported))
