"""A local judge: any model apostate can load (hub id, folder, GGUF, `demo`) reads the rubric
for each (request, response) pair; the verdict comes from the label tokens' probabilities as
the first token of its answer, from one batched forward pass (no generation).

For label ℓ with first-token variants T(ℓ) ("refusal", "Refusal", " refusal", ...), with p the
judge's next-token distribution once the chat template opens the assistant's turn:

    score(ℓ) = log Σ_{t ∈ T(ℓ)} p(t) − b(ℓ),     verdict = argmax_{ℓ ∈ choices} score(ℓ)

b(ℓ) is the judge's bias: its mean score(ℓ) on content-free pairs ("N/A"), measured once at
`check()` (contextual calibration, Zhao et al. 2021, arXiv:2102.09690). Small judges lean
heavily to one label whatever the response; the calibration takes that lean away.
The rubric and its examples are a prefix all pairs share, run once per pass (PromptSet).
"""

from __future__ import annotations

import torch

from apostate.decoding import PromptSet
from apostate.errors import ApostateError
from apostate.scoring.judges.rubric import CONTENT_FREE, LABELS, judge_messages
from apostate.scoring.verdicts import Verdict


class ModelJudge:
    def __init__(self, model, tokenizer, name: str, batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.name = f"model:{name}"
        self.batch_size = batch_size
        self.label_tokens = label_token_ids(tokenizer, name)
        self.bias: torch.Tensor | None = None  # b(ℓ), from check()

    def check(self) -> None:
        """The chat template must take the rubric as a system message; measures the judge's bias."""
        try:
            texts = [judge_text(self.tokenizer, prompt, response) for prompt, response in CONTENT_FREE]
        except Exception as error:
            raise ApostateError(
                f"judge model '{self.name.removeprefix('model:')}' cannot format the rubric with its chat template "
                f"({error}); pick a chat model as judge"
            ) from None
        self.bias = self.label_scores(texts).mean(dim=0)

    def verdicts(
        self, prompts: list[str], responses: list[str], choices: tuple[Verdict, ...] = tuple(LABELS.values())
    ) -> list[Verdict]:
        """The likeliest of `choices` (after the bias) for each pair."""
        if not prompts:
            return []
        if self.bias is None:
            self.check()
        pairs = zip(prompts, responses, strict=True)
        scores = self.label_scores([judge_text(self.tokenizer, prompt, response) for prompt, response in pairs])
        labels = [label for label in self.label_tokens if LABELS[label] in choices]
        columns = [list(self.label_tokens).index(label) for label in labels]
        calibrated = (scores - self.bias)[:, columns]
        return [LABELS[labels[index]] for index in calibrated.argmax(dim=-1).tolist()]

    def label_scores(self, texts: list[str]) -> torch.Tensor:
        """(texts, labels) log-probabilities of each label as the answer's first token."""
        device = self.model.get_input_embeddings().weight.device
        logprobs = PromptSet(self.tokenizer, texts, self.batch_size, device).first_token_logprobs(self.model)
        return torch.stack([logprobs[:, ids].logsumexp(dim=-1) for ids in self.label_tokens.values()], dim=-1)


def judge_text(tokenizer, prompt: str, response: str) -> str:
    return tokenizer.apply_chat_template(judge_messages(prompt, response), add_generation_prompt=True, tokenize=False)


def label_token_ids(tokenizer, name: str) -> dict[str, list[int]]:
    """Each label's possible first tokens; a token two labels share tells them apart from neither, so it is dropped."""
    firsts = {}
    for label in LABELS:
        variants = {label, label.capitalize(), label.upper(), " " + label, " " + label.capitalize()}
        firsts[label] = {ids[0] for ids in (tokenizer.encode(v, add_special_tokens=False) for v in variants) if ids}
    ids = {}
    for label, tokens in firsts.items():
        others = set().union(*(firsts[other] for other in firsts if other != label))
        ids[label] = sorted(tokens - others)
        if not ids[label]:
            raise ApostateError(
                f"judge model '{name}': its tokenizer gives the label '{label}' no first token of its own; "
                "pick another judge model"
            )
    return ids
