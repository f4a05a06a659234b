"""Summary statistics over repetitions, and which direction is better for each metric."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

#: Metrics where a larger value is better; every other metric is lower-is-better.
HIGHER_IS_BETTER = frozenset({"gen_tok_s", "prompt_tok_s", "client_gen_tok_s"})


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER or metric.endswith("_tok_s")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100), like numpy's default."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def summarize(samples: Sequence[float]) -> dict[str, Any]:
    """``{median, mean, stddev, iqr, min, max, n, samples}`` with builtin types only."""
    values = [float(v) for v in samples]
    if not values:
        return {"n": 0, "samples": []}
    return {
        "median": statistics.median(values),
        "mean": statistics.fmean(values),
        "stddev": statistics.stdev(values) if len(values) > 1 else 0.0,
        "iqr": percentile(values, 75) - percentile(values, 25),
        "min": min(values),
        "max": max(values),
        "n": len(values),
        "samples": values,
    }
