"""The gate's statistics: the two-sided Mann-Whitney U test and a bootstrap ratio interval.

Pure functions of two samples; nothing here knows about reports, metrics or verdicts.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
from collections.abc import Sequence

from pytest_llamabench.stats import percentile

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
#: Largest per-side sample size for the exact Mann-Whitney distribution.
_EXACT_MAX = 50


@dataclasses.dataclass(frozen=True)
class MannWhitney:
    """``u`` is the statistic of the first sample (as scipy reports it)."""

    u: float
    p_value: float
    method: str  # "exact" | "asymptotic"


def mann_whitney_u(a: Sequence[float], b: Sequence[float]) -> MannWhitney:
    """Two-sided Mann-Whitney U test of ``a`` against ``b``.

    Exact when there are no ties and each side has at most 50 values; otherwise the
    normal approximation with tie correction and continuity correction (scipy's
    ``method="asymptotic"``).
    """
    n1, n2 = len(a), len(b)
    if n1 == 0 or n2 == 0:
        raise ValueError("Mann-Whitney U needs at least one value on each side")
    ranks, tie_sizes = _midranks([*a, *b])
    u1 = sum(ranks[:n1]) - n1 * (n1 + 1) / 2
    u_big = max(u1, n1 * n2 - u1)
    if not tie_sizes and max(n1, n2) <= _EXACT_MAX:
        counts = _u_counts(n1, n2)
        tail = sum(counts[round(u_big) :]) / math.comb(n1 + n2, n1)
        return MannWhitney(u1, min(1.0, 2 * tail), "exact")
    n = n1 + n2
    tie_term = sum(t**3 - t for t in tie_sizes)
    variance = n1 * n2 / 12 * ((n + 1) - tie_term / (n * (n - 1))) if n > 1 else 0.0
    if variance <= 0:
        return MannWhitney(u1, 1.0, "asymptotic")
    z = (u_big - n1 * n2 / 2 - 0.5) / math.sqrt(variance)
    return MannWhitney(u1, min(1.0, math.erfc(z / math.sqrt(2))), "asymptotic")


def _midranks(values: Sequence[float]) -> tuple[list[float], list[int]]:
    """1-based ranks with ties sharing their mean rank, and the sizes of tie groups (>1)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    ranks = [0.0] * len(values)
    ties: list[int] = []
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            ranks[order[k]] = (start + end) / 2 + 1
        if end > start:
            ties.append(end - start + 1)
        start = end + 1
    return ranks, ties


@functools.lru_cache(maxsize=256)
def _u_counts(m: int, n: int) -> tuple[int, ...]:
    """How many orderings of m + n distinct values give each U in 0..m*n.

    These are the coefficients of the Gaussian binomial (m+n choose m)_q, built as
    prod_{i=1..m} (1 - q^(n+i)) / (1 - q^i); terms above degree m*n never feed back.
    """
    top = m * n
    coeffs = [1] + [0] * top
    for i in range(1, m + 1):
        for j in range(top, n + i - 1, -1):  # times (1 - q^(n+i))
            coeffs[j] -= coeffs[j - n - i]
        for j in range(i, top + 1):  # divided by (1 - q^i)
            coeffs[j] += coeffs[j - i]
    return tuple(coeffs)


def min_exact_p(n1: int, n2: int) -> float:
    """The smallest two-sided p-value the exact test can give for these sample sizes."""
    return min(1.0, 2 / math.comb(n1 + n2, n1))


def min_repetitions(alpha: float = 0.05) -> int:
    """The fewest samples per side at which the exact two-sided MWU test can reach ``alpha``."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    n = 1
    while min_exact_p(n, n) > alpha:
        n += 1
    return n


def bootstrap_ratio_ci(
    base: Sequence[float],
    new: Sequence[float],
    *,
    confidence: float = 0.95,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> tuple[float, float] | None:
    """Percentile bootstrap interval of median(new) / median(base); None if undefined."""
    rng = random.Random(seed)
    ratios: list[float] = []
    for _ in range(resamples):
        base_median = _median(rng.choices(base, k=len(base)))
        new_median = _median(rng.choices(new, k=len(new)))
        if base_median != 0:
            ratios.append(new_median / base_median)
    if not ratios:
        return None
    tail = (1 - confidence) / 2 * 100
    return percentile(ratios, tail), percentile(ratios, 100 - tail)


def _median(values: list[float]) -> float:
    """statistics.median without its overhead (the bootstrap calls this 4000 times a row)."""
    values.sort()
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


__all__ = ["MannWhitney", "bootstrap_ratio_ci", "mann_whitney_u", "min_exact_p", "min_repetitions"]
