"""Hand labels of two edits' answers to the same held-out prompts, compared: how many of each
label per edit, per rater, and whether one edit leaves fewer evasive answers (exact sign test on
the prompts where the two edits' labels differ, counted by the raters who labelled both).

    .venv/bin/python bench/paired_labels.py [bench/data/evasion_labels.jsonl]

Each line: {"prompt", "category", "<edit>": {"answer", "labels": {rater: label}}, ...}. The file
kept here: trial 17 of the demo run (`ara-lora`, fit at the last prompt position) against the
same parameters fitted at the last 6 positions with the steer weight doubled (held-out
first-token KL 0.0461 against 0.0442), answers of 256 tokens (bench/evasion.py). Raters: A
labelled edit 1 only, B edit 6 (and 30 of edit 1), C and D both edits of 50 prompts each, blind to
which edit wrote which answer.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from pathlib import Path

LABELS = ("refusal", "evasive", "compliance", "broken")
DEFAULT = Path(__file__).resolve().parent / "data" / "evasion_labels.jsonl"


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact binomial p-value of `wins` against `losses` at even odds."""
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2**n
    return min(1.0, 2 * tail)


def counts_text(counter: Counter) -> str:
    return "  ".join(f"{label} {counter[label]:>3}" for label in LABELS)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    edits = [key for key in rows[0] if key not in ("prompt", "category")]
    first, second = edits
    raters = sorted({rater for row in rows for edit in edits for rater in row[edit]["labels"]})
    print(f"{len(rows)} prompts; edits {first} and {second}; raters {', '.join(raters)}\n")
    for rater in raters:
        for edit in edits:
            counter = Counter(row[edit]["labels"][rater] for row in rows if rater in row[edit]["labels"])
            if counter:
                print(f"rater {rater}, {edit:>16} ({sum(counter.values()):>3}): {counts_text(counter)}")
    both = [
        (row[first]["labels"][r], row[second]["labels"][r])
        for row in rows
        for r in raters
        if r in row[first]["labels"] and r in row[second]["labels"]
    ]
    print(f"\nSame rater, both edits ({len(both)} prompts):")
    for edit, side in ((first, 0), (second, 1)):
        print(f"  {edit:>16}: {counts_text(Counter(pair[side] for pair in both))}")
    for label in LABELS:
        only_first = sum(a == label != b for a, b in both)
        only_second = sum(b == label != a for a, b in both)
        print(
            f"  {label:>10}: {only_first} prompts only {first}, {only_second} only {second} "
            f"(sign test p = {sign_test(only_first, only_second):.3f})"
        )
    print("\nAgreement between raters on the same answer:")
    for edit in edits:
        pairs = Counter()
        for row in rows:
            labels = row[edit]["labels"]
            names = sorted(labels)
            for i, a in enumerate(names):
                for b in names[i + 1 :]:
                    pairs[(a, b, labels[a] == labels[b])] += 1
        for a, b in sorted({(a, b) for a, b, _ in pairs}):
            agree, total = pairs[(a, b, True)], pairs[(a, b, True)] + pairs[(a, b, False)]
            print(f"  {edit:>16}, raters {a} and {b}: {agree}/{total}")


if __name__ == "__main__":
    main()
