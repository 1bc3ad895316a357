"""Shared by the export tests: run to a saved trial, and re-score the saved folder with plain transformers."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from apostate.cli import main
from apostate.scoring.scorer import first_token_logprobs, kl_divergence
from apostate.search.startup import Texts, load_prompt_sets
from apostate.settings import parse_command_line


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
    prefix = torch.load(run_dir / "startup.pt", weights_only=False)["startup"].response_prefix
    texts = Texts(tokenizer, settings, load_prompt_sets(settings), prefix).of("harmless", subset)
    return kl_divergence(
        first_token_logprobs(base, tokenizer, texts, 8, "cpu"),
        first_token_logprobs(exported, tokenizer, texts, 8, "cpu"),
    )
