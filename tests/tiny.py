"""Tiny random chat models built in-process (no download): a byte-level tokenizer with a
chat template, and a small decoder of any transformers architecture."""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|pad|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(chat_template: str | None = CHAT_TEMPLATE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {token: index for index, token in enumerate(SPECIAL + sorted(alphabet))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = chat_template
    tokenizer.padding_side = "left"  # as loading sets it: the last prompt token sits at position -1
    return tokenizer


def tiny_model(architecture: str = "qwen2", layers: int = 4, seed: int = 0, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
    config = AutoConfig.for_model(
        architecture,
        num_hidden_layers=layers,
        head_dim=16,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
        **(shape | extra),
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    return model, tokenizer


def tiny_model_folder(
    path: Path, architecture: str = "qwen2", chat_template: str | None = CHAT_TEMPLATE, **extra
) -> Path:
    model, tokenizer = tiny_model(architecture, **extra)
    tokenizer.chat_template = chat_template
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# How far two ways of computing the same KL divergence on a tiny model may differ by rounding alone
# (another summation order: another kernel, memory layout or processor). KL = Σ p (log p − log q)
# moves by at most the largest change of a log-probability, once on p's side and once on q's. The
# tiny model's float32 log-probabilities are at most log(259) ≈ 5.6 in size (ulp 4.8e-7), and a
# reordered sum over its few layers moves them by a few ulps: 2 × 2 ulps ≈ 2e-6, whatever the
# processor. (Relative tolerances fail here: the KLs are ~1e-5, the same order as the rounding.)
KL_ROUNDING = 2e-6

# Settings for a fast run on a tiny model: a few prompts, short responses.
# The tests' runs use directional ablation (fast, no captures) unless they ask for a method;
# the ARA methods have their own tests.
SMALL = (
    "--method directional --dtypes float32 --batch-size 8 --max-response-tokens 6 --n-startup-trials 2 "
    "--harmless.direction-count 12 --harmless.evaluation-count 6 --harmless.heldout-count 6 "
    "--harmful.direction-count 12 --harmful.evaluation-count 6 --harmful.heldout-count 6"
).split()


def decisive_chat_model(prompts: list[str], layers: int = 4, seed: int = 4):
    """A tiny model with large weights (decisive logits: float noise cannot flip an argmax),
    set up as loading sets it, and `prompts` chat-templated for it: (model, tokenizer, texts)."""
    model, tokenizer = tiny_model("qwen2", layers=layers, seed=seed, initializer_range=0.3)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tokenizer.padding_side = "left"
    texts = [
        tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    return model, tokenizer, texts


def some_refusing(prompts: list[str]):
    """A decisive tiny model on `prompts`, refusal markers that some (not all) of its greedy answers
    hold, and a marker scorer factory over them: (model, tokenizer, texts, markers, make_scorer)."""
    from apostate.decoding import PromptSet
    from apostate.scoring.judges.markers import MarkerJudge
    from apostate.scoring.scorer import Scorer

    model, tokenizer, texts = decisive_chat_model(prompts)
    plain = PromptSet(tokenizer, texts, 4, "cpu").greedy_responses(model, 8)
    markers = sorted({response.split()[0] for response in plain if response.split()})[:2]

    def make_scorer(label: str = "evaluation") -> Scorer:
        harmless = PromptSet(tokenizer, texts, 4, "cpu")
        harmful = PromptSet(tokenizer, texts, 4, "cpu", reuse_responses=True, nearness=harmless)
        return Scorer(harmless, harmful, prompts, MarkerJudge(markers), 8, label)

    return model, tokenizer, texts, markers, make_scorer
