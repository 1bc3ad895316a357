"""A tiny random chat model written as a GGUF file (qwen2 architecture, float32 tensors, the
tiny byte-level tokenizer with its chat template), as llama.cpp's converter lays one out: what the
GGUF export tests read as their base. `slow_types` stores chosen tensors in a type the gguf package
can read but not write (all-zero blocks: they dequantize to zeros)."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from tiny import CHAT_TEMPLATE, tiny_model


def tiny_gguf(path: Path, layers: int = 2, seed: int = 0, slow_types: dict | None = None, **config) -> Path:
    model, tokenizer = tiny_model(layers=layers, seed=seed, **config)
    settings = model.config
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_name("tiny")
    writer.add_block_count(settings.num_hidden_layers)
    writer.add_context_length(512)
    writer.add_embedding_length(settings.hidden_size)
    writer.add_feed_forward_length(settings.intermediate_size)
    writer.add_head_count(settings.num_attention_heads)
    writer.add_head_count_kv(settings.num_key_value_heads)
    writer.add_rope_freq_base(settings.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(settings.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    tokens = [token for token, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_scores([0.0] * len(tokens))  # the byte-level vocabulary has no merges
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHAT_TEMPLATE)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, settings.num_hidden_layers)
    for name, parameter in model.state_dict().items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        kind = (slow_types or {}).get(gguf_name)
        if kind is None:
            writer.add_tensor(gguf_name, parameter.detach().float().numpy())
        else:
            byte_shape = gguf.quant_shape_to_byte_shape(tuple(parameter.shape), kind)
            writer.add_tensor(gguf_name, np.zeros(byte_shape, np.uint8), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
