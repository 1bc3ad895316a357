"""A decoding pass with its Linear layers on real tokens only computes what the padded pass computes."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from tiny import tiny_model

from apostate.decoding.prefix_cache import positions
from apostate.decoding.real_positions import on_real_positions, position_wise_modules


def test_padding_is_skipped_and_real_positions_keep_their_outputs():
    model, _ = tiny_model("qwen2", layers=3, seed=4, initializer_range=0.3)
    # An adapter with nonzero factors, as during trials: PEFT wraps the writers it edits.
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["o_proj", "down_proj"], init_lora_weights=False))
    inner = model.get_base_model()
    modules = position_wise_modules(inner)
    assert len(modules) == 3 * 5  # per layer: the MLP block, and the q, k, v and o projections
    torch.manual_seed(0)
    rows, prompt, width = 4, 7, 5
    with torch.inference_mode():
        cache = inner(input_ids=torch.randint(3, 200, (rows, prompt)), use_cache=True).cache
    lengths = torch.tensor([5, 1, 3, 1])  # each row's last token and its draft; the rest is padding
    real = torch.arange(width)[None] < lengths[:, None]
    mask = torch.cat([torch.ones(rows, prompt, dtype=torch.long), real.long()], 1)
    step = dict(
        input_ids=torch.randint(3, 200, (rows, width)), attention_mask=mask, position_ids=positions(mask, width)
    )
    seen: list[int] = []
    for layer in inner.model.layers:
        layer.mlp.act_fn.register_forward_hook(lambda _m, args, _o: seen.append(args[0].shape[-2]))
    with torch.inference_mode():
        padded = inner.get_decoder()(**step, cache=copy.deepcopy(cache), use_cache=True).last_hidden_state
        with on_real_positions(modules, real):
            ragged = inner.get_decoder()(**step, cache=copy.deepcopy(cache), use_cache=True).last_hidden_state
        after = inner.get_decoder()(**step, cache=copy.deepcopy(cache), use_cache=True).last_hidden_state
    assert seen == [width] * 3 + [int(real.sum())] * 3 + [width] * 3  # the MLPs ran on 10 of 20 slots
    assert torch.allclose(ragged[real], padded[real], atol=1e-5)
    assert not torch.allclose(ragged[~real], padded[~real])  # padding really was left out
    assert torch.equal(after, padded)  # the hooks are gone after the pass
