"""One line of a gate comparison (``Row``) and the verdicts it can carry: shared by the noise-aware
comparison of speed metrics (``verdicts``) and the exact one of deterministic metrics (``exact``)."""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Sequence

REGRESSED = "regressed"
IMPROVED = "improved"
NO_CHANGE = "no change"
INCONCLUSIVE = "inconclusive"
NEW = "new"
#: Verdicts in the order the summary line lists them.
VERDICTS = (REGRESSED, IMPROVED, INCONCLUSIVE, NEW, NO_CHANGE)
#: The ``metric`` of a row about a result's outcome rather than a measurement.
OUTCOME = "outcome"


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the comparison: a metric of a (config, workload), or its outcome."""

    config: str
    workload: str
    metric: str
    verdict: str
    reason: str = ""
    base_median: float | None = None
    new_median: float | None = None
    ratio: float | None = None
    p_value: float | None = None
    ci: tuple[float, float] | None = None
    n_base: int = 0
    n_new: int = 0
    tolerance: str = ""
    #: what a sample is: a server start's median ("starts") or a repetition of one server
    units: str = "repetitions"
    #: the smallest relative change this comparison detects (80 % power at alpha)
    mde: float | None = None
    base_outcome: str | None = None
    new_outcome: str | None = None
    fingerprint_differs: bool = False

    def sort_key(self) -> tuple[str, str, bool, str]:
        return self.config, self.workload, self.metric != OUTCOME, self.metric


def one_side_missing(row: Row, base: Sequence[float], new: Sequence[float]) -> Row | None:
    """The row of a metric measured on one side only (NEW, or inconclusive when the new run lacks it);
    None when both sides have samples."""
    if not base:
        return dataclasses.replace(row, verdict=NEW, reason="not measured in the base report",
                                   new_median=statistics.median(new))  # fmt: skip
    if not new:
        return dataclasses.replace(row, reason="not measured in the new report", base_median=statistics.median(base))
    return None
