"""KL past the first token: along the base model's own greedy answers, teacher-forced; at k = 1 it
is the first-token KL."""

import pytest
import torch
from tiny import decisive_chat_model, some_refusing

from apostate.decoding import PromptSet
from apostate.scoring.judges.markers import MarkerJudge
from apostate.scoring.scorer import Scorer, answer_kl, kl_divergence

PROMPTS = ["hi", "tell me a story about a dragon", "why?", "list three colours", "how do magnets work, briefly"]


@pytest.fixture
def tiny():
    return decisive_chat_model(PROMPTS, layers=3, seed=5)


def scorer(tokenizer, texts, kl_tokens: int) -> Scorer:
    harmless, harmful = PromptSet(tokenizer, texts, 2, "cpu"), PromptSet(tokenizer, texts, 2, "cpu")
    return Scorer(harmless, harmful, PROMPTS, MarkerJudge(["sorry"]), 4, "test", kl_tokens)


def test_k_token_kl_is_the_first_token_kl_at_k_1_and_reads_further_above(tiny):
    model, tokenizer, texts = tiny
    first, one, eight = (scorer(tokenizer, texts, k) for k in (1, 1, 8))
    for each in (first, one, eight):
        each.record_base(model)
    assert eight.base_answers and all(0 < len(answer) <= 7 for answer in eight.base_answers)
    assert eight.kl(model) == pytest.approx(0.0, abs=1e-6), "the base model against itself"
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    first_kl = first.kl(model)
    assert first_kl > 0
    # k = 1, computed along (empty) answers, is the first-token KL.
    rows = one.harmless.continued([[] for _ in texts])
    answer_rows = rows.answer_logprobs(model)
    base_rows = [row.unsqueeze(0) for row in one.base_logprobs]
    assert answer_kl(base_rows, answer_rows) == pytest.approx(first_kl, rel=1e-5)
    assert eight.first_token_kl(model) == pytest.approx(first_kl, rel=1e-5)
    # k = 8: the mean over each answer's positions of the per-position KL.
    eight_kl = eight.kl(model)
    model_rows = eight.answers.answer_logprobs(model)
    by_hand = sum(
        sum(kl_divergence(base[t : t + 1], mine[t : t + 1]) for t in range(len(base))) / len(base)
        for base, mine in zip(eight.base_answer_logprobs, model_rows, strict=True)
    ) / len(texts)
    assert eight_kl == pytest.approx(by_hand, rel=1e-4)
    assert eight_kl != pytest.approx(first_kl, rel=1e-3)


def test_a_resumed_scorer_measures_the_same_k_token_kl(tiny):
    model, tokenizer, texts = tiny
    measured = scorer(tokenizer, texts, 6)
    measured.record_base(model)
    resumed = scorer(tokenizer, texts, 6)
    resumed.resume_from_base(measured.base_logprobs, [], measured.base_answers, model)
    with torch.no_grad():
        model.model.layers[2].self_attn.o_proj.weight.mul_(2)
    assert resumed.kl(model) == pytest.approx(measured.kl(model), rel=1e-6)


def test_counting_stops_once_enough_responses_failed_and_never_undercounts_those_finished():
    """Scorer.count(enough_failures=n): at least n failures among the responses it finished, each
    with the verdict full counting gives it; with n above the full count, the full count."""
    prompts = [f"question number {n} about {topic}" for n, topic in enumerate(["rivers", "salt", "owls"] * 4)]
    model, _, _, _, scorer = some_refusing(prompts)
    full = scorer().count(model)
    assert 2 <= full.failures < full.total == len(prompts)
    stopped = scorer().count(model, enough_failures=2)
    assert stopped.failures >= 2 and stopped.total < full.total
    assert stopped.refusals <= full.refusals and stopped.broken <= full.broken
    assert scorer().count(model, enough_failures=full.failures + 1) == full
