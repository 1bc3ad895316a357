"""The decoding seam (PromptSet) gives what the plain paths give: shared-prefix cache, drafts from
earlier responses, replayed layers."""

from __future__ import annotations

import random

import pytest
import torch
from tiny import decisive_chat_model, tiny_model

from apostate.decoding import PromptSet
from apostate.decoding.batching import last_position_logprobs
from apostate.decoding.cpu_kernels import column_major_cpu_weights
from apostate.decoding.generation import generate_plain, generate_plain_ids
from apostate.decoding.prefix_cache import SharedPrefix
from apostate.decoding.response_pool import CONTINUATION, LOOKUP, DraftStats, PassCost, ResponsePool, best_width

PROMPTS = ["hi", "tell me a story about a dragon", "why?", "list three colours", "a", "how do magnets work, briefly"]
TOKENS = 12


@pytest.fixture(scope="module")
def tiny():
    # Larger weights than the default init: decisive logits, so float noise cannot flip an argmax.
    model, tokenizer = tiny_model("qwen2", layers=2, seed=4, initializer_range=0.3)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tokenizer.padding_side = "left"  # as loading sets it
    texts = [
        tokenizer.apply_chat_template(
            [{"role": "system", "content": "You are terse."}, {"role": "user", "content": p}],
            add_generation_prompt=True,
            tokenize=False,
        )
        for p in PROMPTS
    ]
    return model, tokenizer, texts


def plain(model, tokenizer, texts, stop_when=None):
    return generate_plain(model, tokenizer, texts, TOKENS, 4, "cpu", stop_when, None)


def drafting(tokenizer, texts, batch_size=4) -> PromptSet:
    """A prompt set that drafts from its earlier responses."""
    return PromptSet(tokenizer, texts, batch_size, "cpu", reuse_responses=True)


def test_the_shared_prefix_is_the_common_template_head(tiny):
    _, tokenizer, texts = tiny
    shared = SharedPrefix.of(tokenizer, texts)
    assert tokenizer.decode(shared.prefix) == "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\n"
    full = tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert all(shared.prefix + suffix == row for suffix, row in zip(shared.suffixes, full, strict=True))


def test_first_token_distributions_with_a_shared_prefix_equal_the_plain_pass(tiny):
    model, tokenizer, texts = tiny
    plain_logprobs = last_position_logprobs(model, tokenizer, texts, 4, "cpu")
    shared_logprobs = PromptSet(tokenizer, texts, 4, "cpu").first_token_logprobs(model)
    assert torch.allclose(plain_logprobs, shared_logprobs, atol=1e-5)


def corrupted(responses: list[list[int]], seed: int) -> list[list[int]]:
    """Each response with one token changed somewhere, or cut short, or replaced by noise."""
    rng = random.Random(seed)
    out = []
    for tokens in responses:
        tokens = list(tokens)
        kind = rng.choice(["change", "cut", "noise"])
        if kind == "change" and tokens:
            tokens[rng.randrange(len(tokens))] = rng.randrange(3, 200)
        elif kind == "cut":
            tokens = tokens[: rng.randrange(len(tokens) + 1)]
        else:
            tokens = [rng.randrange(3, 200) for _ in range(TOKENS)]
        out.append(tokens)
    return out


def test_greedy_responses_equal_transformers_generate_with_any_drafts(tiny):
    model, tokenizer, texts = tiny
    expected = plain(model, tokenizer, texts)
    recorded = drafting(tokenizer, texts)
    assert recorded.greedy_responses(model, TOKENS) == expected  # no drafts yet
    exact = recorded.latest_responses()
    for seed in range(4):  # wrong drafts of every kind, newest first, then the exact ones behind them
        prompts = drafting(tokenizer, texts)
        prompts.remember_base(responses=exact)
        for index, tokens in enumerate(corrupted(exact, seed)):
            prompts.pool.add(index, tokens)
        assert prompts.greedy_responses(model, TOKENS) == expected


def test_correct_drafts_take_one_forward_pass_per_batch(tiny, monkeypatch):
    model, tokenizer, texts = tiny
    prompts = drafting(tokenizer, texts, batch_size=3)
    first = prompts.greedy_responses(model, TOKENS)  # fills the pool
    prompts.pool.stats.accepted = 1000  # a history of drafts that were right: long drafts pay
    calls = []
    decoder = model.get_decoder()  # every pass runs it, whether or not logits are wanted
    original = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    assert prompts.greedy_responses(model, TOKENS) == first
    # One pass for the shared prefix, one per batch of 3 prompts, then one decoding pass per
    # batch of 3 responses: every draft was accepted whole.
    assert len(texts) == 6 and len(calls) == 1 + 2 + 2


def test_early_stop_gives_the_verdicts_of_full_generation(tiny):
    model, tokenizer, texts = tiny
    full = plain(model, tokenizer, texts)
    # A "marker" that some responses contain: the second character of the first response.
    marker = full[0][1:3]
    decided = lambda text: marker in text  # noqa: E731
    fast = drafting(tokenizer, texts).greedy_responses(model, TOKENS, stop_when=decided)
    assert [marker in r for r in fast] == [marker in r for r in full]
    assert any(len(f) < len(r) for f, r in zip(fast, full, strict=True))  # some stopped early


def test_draft_width_follows_acceptance_and_the_cost_of_wide_passes():
    drafts = [[1] * 20] * 16
    cpu = PassCost()  # no samples yet: the 2-core CPU default
    assert best_width(drafts, 1, acceptance=0.1, cost=cpu) == 0  # wrong drafts only cost
    assert best_width(drafts, 1, acceptance=0.99, cost=cpu) == 20  # right drafts save passes
    gpu = PassCost()
    for tokens in (16, 128, 512):  # a pass costs about the same whatever its width
        gpu.add(tokens, 0.02 + 1e-6 * tokens)
    assert best_width(drafts, 1, acceptance=0.5, cost=gpu) >= 8
    assert best_width(drafts, 1, acceptance=0.5, cost=cpu) < 8
    # Per row: a few rows with sure drafts among unsure ones still earn a wide pass on the GPU.
    assert best_width(drafts, 1, acceptance=[0.99] * 4 + [0.1] * 12, cost=gpu) == 20


def test_acceptance_is_kept_per_kind_of_draft():
    stats = DraftStats()
    for _ in range(20):
        stats.record(CONTINUATION, proposed=8, accepted=8)
        stats.record(LOOKUP, proposed=8, accepted=0)
    assert stats.acceptance(CONTINUATION) > 0.9 > stats.acceptance() > 0.5 > stats.acceptance(LOOKUP)
    pool = ResponsePool(1)
    pool.add(0, [1, 2, 3, 4, 5, 6])
    assert pool.propose(0, [1, 2], 2) == ([3, 4], CONTINUATION)
    assert pool.propose(0, [7, 2, 3, 4], 2) == ([5, 6], LOOKUP)  # re-aligned on the last tokens


def test_drafts_come_from_the_nearest_earlier_model_first():
    pool = ResponsePool(1)
    near, far = torch.zeros(2, 3), torch.full((2, 3), 5.0)
    pool.begin(near)
    pool.add(0, [1, 2, 3, 4])
    pool.begin(far)
    pool.add(0, [1, 2, 9, 9])
    pool.begin(far + 0.1)  # like the newest model
    assert pool.propose(0, [1, 2], 2)[0] == [9, 9]
    pool.begin(near + 0.1)  # like the first model, although its response is older
    assert pool.propose(0, [1, 2], 2)[0] == [3, 4]
    assert pool.propose(0, [5, 5, 5], 2)[0] == []  # nothing known matches: no draft


def test_column_major_weights_change_no_output():
    model, tokenizer = tiny_model("qwen2", layers=2, seed=4, initializer_range=0.3)
    inputs = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        before = model(**inputs).logits
        shapes = {name: p.shape for name, p in model.named_parameters()}
        assert column_major_cpu_weights(model, lambda weight: False) == 0  # where it would not pay
        changed = column_major_cpu_weights(model, lambda weight: True)
        after = model(**inputs).logits
    linear_weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert changed == len(linear_weights) > 0
    assert all(w.stride() == (1, w.shape[0]) for w in linear_weights)
    assert {name: p.shape for name, p in model.named_parameters()} == shapes
    assert torch.allclose(before, after, rtol=1e-6, atol=1e-6)  # the same products, maybe another kernel


def test_replayed_layers_give_what_running_them_gives():
    model, tokenizer, texts = decisive_chat_model(PROMPTS)
    harmless, harmful = PromptSet(tokenizer, texts, 4, "cpu"), PromptSet(tokenizer, texts, 4, "cpu")
    base = harmless.first_token_logprobs(model, edited_layers=set())  # no edit: records every layer
    harmful.greedy_responses(model, TOKENS, edited_layers=set())
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(3)  # an edit of layer 2: layers 0 and 1 are the base's
    calls = []
    model.model.layers[0].register_forward_hook(lambda *_: calls.append(1))
    expected = PromptSet(tokenizer, texts, 4, "cpu").first_token_logprobs(model)
    expected_responses = PromptSet(tokenizer, texts, 4, "cpu").greedy_responses(model, TOKENS)
    plain_calls = len(calls)
    assert not torch.allclose(expected, base)
    calls.clear()
    layers = list(model.model.layers)
    assert torch.equal(harmless.first_token_logprobs(model, edited_layers={2, 3}), expected)
    assert harmful.greedy_responses(model, TOKENS, edited_layers={2}) == expected_responses
    assert len(calls) == plain_calls - 2 - 2  # layer 0 skipped in both prompt passes of both sets
    assert list(model.model.layers) == layers  # every replayed layer is back in place
    # Replaying the edited layer too gives the base model's layer 2: the records are what runs.
    assert not torch.equal(harmless.first_token_logprobs(model, edited_layers={3}), expected)


def test_layers_are_put_back_when_a_replayed_pass_fails(tiny, monkeypatch):
    model, tokenizer, texts = tiny
    prompts = PromptSet(tokenizer, texts, 4, "cpu")
    prompts.first_token_logprobs(model, edited_layers=set())  # records
    layers = list(model.model.layers)
    norm = model.model.norm
    monkeypatch.setattr(norm, "forward", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        prompts.first_token_logprobs(model, edited_layers={1})
    assert list(model.model.layers) == layers


def test_each_pass_carries_the_least_advanced_sequences(tiny, monkeypatch):
    import apostate.decoding.speculative as speculative

    model, tokenizer, texts = tiny
    expected = plain(model, tokenizer, texts)
    prompts = drafting(tokenizer, texts, batch_size=2)
    prompts.greedy_responses(model, TOKENS)
    for index, tokens in enumerate(corrupted(prompts.latest_responses(), seed=1)):
        prompts.pool.add(index, tokens)  # some drafts hold to the end, some break early: sequences advance unevenly
    passes: list[tuple[list[int], list[int]]] = []  # per pass: known lengths carried, and left to wait
    choose = speculative.least_advanced

    def spy(running, count):
        chosen = choose(running, count)
        passes.append(([len(s.known) for s in chosen], [len(s.known) for s in running if s not in chosen]))
        return chosen

    monkeypatch.setattr(speculative, "least_advanced", spy)
    assert prompts.greedy_responses(model, TOKENS) == expected
    assert all(len(carried) <= 2 for carried, _ in passes)
    assert any(waiting and len(set(carried + waiting)) > 1 for carried, waiting in passes)  # a real choice was made
    assert all(max(carried) <= min(waiting, default=TOKENS) for carried, waiting in passes)


def test_answer_distributions_are_teacher_forced_in_one_pass_and_start_with_the_first_token(tiny, monkeypatch):
    model, tokenizer, texts = tiny
    prompts = PromptSet(tokenizer, texts, 3, "cpu")
    answers = prompts.greedy_tokens(model, 6)
    assert answers == generate_plain_ids(model, tokenizer, texts, 6, 4, "cpu")
    continued = prompts.continued(answers)
    calls = []
    decoder = model.get_decoder()
    original = decoder.forward
    monkeypatch.setattr(decoder, "forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    rows = continued.answer_logprobs(model)
    assert len(calls) == 1 + 2, "one pass for the shared prefix, one per batch of 3: no generation"
    assert [len(r) for r in rows] == [len(a) + 1 for a in answers]
    first = PromptSet(tokenizer, texts, 3, "cpu").first_token_logprobs(model)
    assert torch.allclose(torch.stack([r[0] for r in rows]), first, atol=1e-5)
    for answer, row in zip(answers, rows, strict=True):  # greedy: each position's likeliest token comes next
        assert row[: len(answer)].argmax(-1).tolist() == answer
    monkeypatch.setattr(SharedPrefix, "cache", lambda self, model, device: None)  # the plain path
    plain_rows = continued.answer_logprobs(model)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(rows, plain_rows, strict=True))


def test_replayed_layers_give_the_answer_distributions_of_a_full_pass():
    model, tokenizer, texts = decisive_chat_model(PROMPTS)
    prompts = PromptSet(tokenizer, texts, 4, "cpu")
    continued = prompts.continued(prompts.greedy_tokens(model, 5))
    base = continued.answer_logprobs(model, edited_layers=set())  # records every layer
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.mul_(3)
    full = continued.answer_logprobs(model)
    replayed = continued.answer_logprobs(model, edited_layers={2})
    assert not torch.allclose(full[0], base[0])
    assert all(torch.equal(a, b) for a, b in zip(full, replayed, strict=True))


@pytest.mark.parametrize("stop_after", [1, 3])
def test_giving_up_leaves_the_finished_responses_exactly_as_full_generation_gives_them(tiny, stop_after):
    """give_up is told each finished response once, as full generation would end it; generation
    stops at its first True, and only the responses not finished by then are missing."""
    model, tokenizer, texts = tiny
    full = drafting(tokenizer, texts, batch_size=2).greedy_tokens(model, TOKENS)
    told = []

    def give_up(index, tokens):
        told.append(index)
        return len(told) >= stop_after

    partial = drafting(tokenizer, texts, batch_size=2).greedy_tokens(model, TOKENS, give_up=give_up)
    finished = [index for index, tokens in enumerate(partial) if tokens is not None]
    assert sorted(told) == finished and len(set(told)) == len(told)
    assert stop_after <= len(finished) < len(texts)  # stopped, after the pass that reached the count
    for index in finished:
        assert partial[index] == full[index]
    texts_back = drafting(tokenizer, texts, batch_size=2).greedy_responses(model, TOKENS, give_up=give_up)
    assert any(text is None for text in texts_back)
