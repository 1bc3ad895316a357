"""What a response is: a refusal, a real answer (compliance), or broken text; and counts of them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum


class Verdict(str, Enum):
    REFUSAL = "refusal"
    COMPLIANCE = "compliance"
    BROKEN = "broken"  # repetition loops, gibberish, off-topic or wrong-language text: never a success


@dataclass(frozen=True)
class VerdictCounts:
    """How many responses got each verdict. `failures` (refusals and broken answers) is what the
    search minimizes: an edit that breaks the model is no better than one that leaves it refusing."""

    refusals: int
    broken: int
    total: int

    @classmethod
    def of(cls, verdicts: Iterable[Verdict]) -> VerdictCounts:
        counts = Counter(verdicts)
        return cls(counts[Verdict.REFUSAL], counts[Verdict.BROKEN], sum(counts.values()))

    @property
    def failures(self) -> int:
        return self.refusals + self.broken

    @property
    def compliant(self) -> int:
        return self.total - self.failures

    def as_dict(self) -> dict:
        return {"refusals": self.refusals, "broken": self.broken, "total": self.total}
