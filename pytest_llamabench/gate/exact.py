"""Verdicts for deterministic metrics (perplexity, KL divergence: ``Metric.deterministic``).

For a fixed build, model and corpus they come out the same on every run, so there is no noise to
model: the new value is compared with the base value directly, and any move past the tolerance
(``ppl:+0.1%``, ``kld_mean:+1%``, ``same_top_p_pct:-0.1``) is a regression or an improvement.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence

from pytest_llamabench.gate.rows import IMPROVED, INCONCLUSIVE, NO_CHANGE, REGRESSED, Row, one_side_missing
from pytest_llamabench.gate.tolerances import Tolerance


def compare_exact(base: Sequence[float], new: Sequence[float], tolerance: Tolerance, *, config: str, workload: str,
                  metric: str) -> Row:  # fmt: skip
    """The gate's row for one deterministic metric of a (config, workload)."""
    row = Row(config, workload, metric, INCONCLUSIVE, n_base=len(base), n_new=len(new), tolerance=str(tolerance),
              units="exact")  # fmt: skip
    if (missing := one_side_missing(row, base, new)) is not None:
        return missing
    b, n = statistics.median(base), statistics.median(new)
    row = dataclasses.replace(row, base_median=b, new_median=n, ratio=n / b if b else None)
    allowed = tolerance.amount * abs(b) if tolerance.relative else tolerance.amount
    change = n - b
    worse = change < 0 if tolerance.higher_is_better else change > 0
    shown = f"{change / b * 100:+.2f}%" if b else f"{change:+.4g}"
    if abs(change) <= allowed:
        return dataclasses.replace(row, verdict=NO_CHANGE, reason=f"{shown} within {tolerance} (deterministic: compared exactly)")
    verdict = REGRESSED if worse else IMPROVED
    return dataclasses.replace(row, verdict=verdict, reason=f"{b:.6g} → {n:.6g} ({shown}) is past {tolerance} "
                                                           "(deterministic: compared exactly, no noise model)")  # fmt: skip


__all__ = ["compare_exact"]
