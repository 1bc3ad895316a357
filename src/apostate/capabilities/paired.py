"""Two models on the same items: each one's accuracy with its standard error, and the paired
difference with a 95% interval and a significance test.

For item scores x_i (base) and y_i (edited), d_i = y_i − x_i, n items:

    accuracy ± SE:    x̄ ± s_x / √n
    difference:       d̄ ± 1.96 · s_d / √n     (normal approximation, 95%)
    p-value:          exact McNemar test on the discordant items (b: right before only,
                      c: right after only): p = min(1, 2 · P[Binomial(b + c, ½) ≤ min(b, c)])

Pairing removes the items both models get right or wrong alike, which is most of them after a
small edit: a drop far inside the unpaired standard errors can still be significant.
"""

from __future__ import annotations

from math import comb, sqrt

Z95 = 1.96


def mean_and_error(scores: list[float]) -> tuple[float, float]:
    """Mean, and its standard error (sample standard deviation / √n; 0 for one item)."""
    n = len(scores)
    mean = sum(scores) / n
    if n < 2:
        return mean, 0.0
    variance = sum((score - mean) ** 2 for score in scores) / (n - 1)
    return mean, sqrt(variance / n)


def mcnemar_p(worse: int, better: int) -> float:
    """Two-sided exact McNemar p-value of `worse` vs `better` discordant items."""
    total = worse + better
    if total == 0:
        return 1.0
    tail = sum(comb(total, k) for k in range(min(worse, better) + 1)) / 2**total
    return min(1.0, 2 * tail)


def paired_difference(base: list[float], edited: list[float], chance: float | None = None) -> dict:
    """Both accuracies, the paired difference (edited − base) with its 95% interval, and the test."""
    if len(base) != len(edited) or not base:
        raise ValueError("paired scores need the same items, at least one")
    base_mean, base_error = mean_and_error(base)
    edited_mean, edited_error = mean_and_error(edited)
    difference, error = mean_and_error([y - x for x, y in zip(base, edited, strict=True)])
    worse = sum(x > y for x, y in zip(base, edited, strict=True))
    better = sum(y > x for x, y in zip(base, edited, strict=True))
    record = {
        "items": len(base),
        "base": {"accuracy": base_mean, "stderr": base_error},
        "edited": {"accuracy": edited_mean, "stderr": edited_error},
        "difference": difference,
        "interval": [difference - Z95 * error, difference + Z95 * error],
        "worse_items": worse,
        "better_items": better,
        "p_value": mcnemar_p(worse, better),
    }
    if chance is not None:
        record["chance"] = chance
    return record
