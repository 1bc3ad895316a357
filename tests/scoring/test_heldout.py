"""The held-out evaluation's full-length reading (commands/evaluate.py: measure_heldout)."""

from types import SimpleNamespace

from tiny import some_refusing

from apostate.commands.evaluate import measure_heldout
from apostate.decoding import PromptSet
from apostate.scoring.judges.markers import MarkerJudge
from apostate.scoring.scorer import ScoringOptions, build_scorer
from apostate.scoring.verdicts import Verdict, VerdictCounts

PROMPTS = [f"question number {n} about {topic}" for n, topic in enumerate(["rivers", "salt", "owls"] * 4)]


def test_with_no_judge_an_answer_stops_at_its_first_marker_and_every_verdict_is_the_full_length_one():
    model, _, _, markers, scorer = some_refusing(PROMPTS)
    measured = measure_heldout(scorer("heldout"), model, None, 24, base=True)
    whole = scorer("heldout").responses(model, early_stop=False, max_new_tokens=24)
    assert measured.full == VerdictCounts.of(MarkerJudge(markers).verdicts(PROMPTS, whole))
    refused = [i for i, verdict in enumerate(measured.verdicts) if verdict == Verdict.REFUSAL]
    assert 0 < len(refused) < len(PROMPTS)
    for index, (answer, full_answer) in enumerate(zip(measured.responses, whole, strict=True)):
        if index in refused:
            assert full_answer.startswith(answer)
        else:
            assert answer == full_answer, "an answer without a marker is read to full length"
    assert any(len(measured.responses[i]) < len(whole[i]) for i in refused), "a refusal stops at its marker"


def test_over_refusals_are_drafted_from_the_base_answers_the_kl_measured_and_stay_the_greedy_ones():
    """The held-out scorer's harmless set keeps the base model's answers (generated for the k-token
    KL): the over-refusal check then confirms them in about a pass per batch, not a pass per token."""
    model, tokenizer, texts, markers, _ = some_refusing(PROMPTS)
    plain = PromptSet(tokenizer, texts, 4, "cpu").greedy_responses(model, 8)
    splits = SimpleNamespace(
        of=lambda side, subset: texts, prompts=SimpleNamespace(harmful=SimpleNamespace(heldout=PROMPTS))
    )
    scorer = build_scorer(tokenizer, "cpu", None, ScoringOptions(8, markers, True, 9), 4, splits, subset="heldout")
    scorer.record_base(model)
    before = scorer.harmless.pool.stats.passes
    refused = scorer.harmless_refusals(model)
    assert refused == [MarkerJudge(markers).refuses(response) for response in plain]
    assert 0 < sum(refused) < len(PROMPTS)
    spent = scorer.harmless.pool.stats.passes - before
    assert spent * 4 < before, f"{spent} passes to confirm answers that took {before} to generate"
