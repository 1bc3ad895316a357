"""What a prompt's earlier responses offer as drafts, and how wide a draft pays on this machine.

See speculative.py for how drafts are checked. Whether drafting pays depends on two things
measured as the run goes: how often draft tokens are right (`DraftStats`) and how much more
a forward pass of many tokens per row costs than one of a single token (`PassCost`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

CONTINUATION, LOOKUP = "continuation", "lookup"  # the kinds of draft (see ResponsePool.propose)


@dataclass
class DraftStats:
    """How well drafting paid: forward passes, and draft tokens offered and kept (also per kind of draft)."""

    passes: int = 0
    proposed: int = 0
    accepted: int = 0
    cut: int = 0  # drafts rejected before their end
    generated: int = 0
    by_kind: dict[str, list[int]] = field(default_factory=dict)  # kind -> [accepted, cut]

    def record(self, kind: str, proposed: int, accepted: int) -> None:
        self.proposed += proposed
        self.accepted += accepted
        self.cut += accepted < proposed
        counts = self.by_kind.setdefault(kind, [0, 0])
        counts[0] += accepted
        counts[1] += accepted < proposed

    def acceptance(self, kind: str | None = None) -> float:
        """Chance that a draft token is right given the ones before it were (geometric model).

        Per kind where asked: a response that agreed with everything so far goes on agreeing
        far more often than a re-aligned one.
        """
        accepted, cut = self.by_kind.get(kind, (self.accepted, self.cut)) if kind else (self.accepted, self.cut)
        return (accepted + 1) / (accepted + cut + 2)


class PassCost:
    """Seconds per forward pass as a + b * (tokens in the pass), fitted to the passes so far.

    Drafting pays where a pass of many tokens costs little more than one of a token per row,
    which holds on GPUs and much less on CPUs; the fit tells which this machine is.
    """

    def __init__(self, history: int = 256):
        self.samples: list[tuple[int, float]] = []
        self.history = history

    def add(self, tokens: int, seconds: float) -> None:
        self.samples.append((tokens, seconds))
        del self.samples[: -self.history]

    def coefficients(self) -> tuple[float, float]:
        if len({tokens for tokens, _ in self.samples}) >= 3:
            x = torch.tensor([[1.0, tokens] for tokens, _ in self.samples], dtype=torch.float64)
            y = torch.tensor([seconds for _, seconds in self.samples], dtype=torch.float64)
            a, b = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1).tolist()
            if a > 0 and b > 0:
                return a, b
        return 1.0, 0.015  # a 2-core CPU on a 0.5B model: 16 rows x 8 tokens cost 2.3 times 16 x 1


class ResponsePool:
    """Earlier responses (token ids) per prompt, to draft from.

    Each response is tagged with a signature of the model that wrote it (its first-token
    log-probabilities on the KL prompts, see PromptSet). Drafts come first from the responses
    of the model nearest to the current one: nearby trials write nearly the same text.
    Without signatures, newest first.
    """

    def __init__(self, size: int, per_prompt: int = 8):
        self.responses: list[list[tuple[int, list[int]]]] = [[] for _ in range(size)]  # (model, tokens)
        self.per_prompt = per_prompt
        self.signatures: list[torch.Tensor | None] = []
        self.rank: dict[int, float] = {}  # model -> distance to the current one
        self.stats = DraftStats()
        self.cost = PassCost()

    def begin(self, signature: torch.Tensor | None = None) -> None:
        """A new model is about to generate: rank the earlier ones by nearness to it."""
        self.signatures.append(signature)
        current = len(self.signatures) - 1
        self.rank = {
            model: (float((signature - other).norm()) if signature is not None and other is not None else 0.0)
            - model * 1e-9  # ties: the newest first
            for model, other in enumerate(self.signatures)
        }
        self.rank[current] = float("-inf")

    def add(self, index: int, tokens: list[int]) -> None:
        if not self.signatures:
            self.begin()
        pool = [(model, old) for model, old in self.responses[index] if old != tokens]
        self.responses[index] = [(len(self.signatures) - 1, tokens), *pool][: self.per_prompt]

    def newest(self) -> list[list[int]]:
        """Each prompt's latest response (empty where it has none)."""
        return [entries[0][1] if entries else [] for entries in self.responses]

    def _ranked(self, index: int) -> list[list[int]]:
        entries = sorted(self.responses[index], key=lambda entry: self.rank.get(entry[0], 0.0))
        return [tokens for _, tokens in entries]

    def propose(self, index: int, known: list[int], length: int, anchor: int = 3) -> tuple[list[int], str]:
        """Up to `length` tokens to guess what follows `known`, and the kind of guess.

        A continuation: the nearest model's response that starts with `known`. Failing that
        (the responses diverged), a lookup: from where the last `anchor` known tokens occur in
        a response, nearest the same position, as in prompt lookup decoding.
        """
        n = len(known)
        responses = self._ranked(index)
        for response in responses:
            if len(response) > n and response[:n] == known:
                return response[n : n + length], CONTINUATION
        if n < anchor:
            return [], LOOKUP
        tail, best, best_shift = known[-anchor:], None, None
        for response in responses:
            for end in range(anchor, len(response)):
                if response[end - anchor : end] == tail and (best_shift is None or abs(end - n) < best_shift):
                    best, best_shift = response[end : end + length], abs(end - n)
        return best or [], LOOKUP


def best_width(drafts: list[list[int]], anchor: int, acceptance: float | list[float], cost: PassCost) -> int:
    """The draft width that yields the most expected tokens per second in this pass.

    `acceptance`: one chance for all rows, or one per row.
    """
    a, b = cost.coefficients()
    rows, longest = len(drafts), max(len(draft) for draft in drafts)
    chances = acceptance if isinstance(acceptance, list) else [acceptance] * rows
    best, best_rate = 0, 0.0
    for width in sorted({0, 1, 2, 4, 8, 16, 32, longest}):
        if width > longest:
            continue
        # Expected tokens: each row's own next token, plus draft tokens until the first wrong one.
        expected = sum(
            1 + sum(chance**k for k in range(1, min(width, len(draft)) + 1))
            for draft, chance in zip(drafts, chances, strict=True)
        )
        rate = expected / (a + b * rows * (anchor + width))
        if rate > best_rate:
            best, best_rate = width, rate
    return best
