"""Check a result against its thresholds (``min_gen_tok_s``, ``max_vram_mib``, ...)."""

from __future__ import annotations

from pytest_llamabench.config import Thresholds
from pytest_llamabench.errors import ThresholdNotMet
from pytest_llamabench.metrics import THRESHOLDS
from pytest_llamabench.results import ResultEntry


def check_thresholds(entry: ResultEntry, thresholds: Thresholds) -> None:
    """Raise ThresholdNotMet listing every miss: measured vs required, and where it was set."""
    misses = []
    for key, limit in thresholds.items():
        metric = THRESHOLDS[key]
        measured = entry.peak(metric.name) if metric.peak else entry.median(metric.name)
        unit = metric.unit
        if measured is None:
            misses.append(f"{key} = {limit:g} {unit}: {metric} was not measured (no GPU?)")
        elif not metric.passes(measured, limit):
            misses.append(f"{metric} {'peak' if metric.peak else 'median'} {measured:.1f} {unit}, "
                          f"required {key} = {limit:g} {unit}")  # fmt: skip
    if not misses:
        return
    load = entry.host_load or {}
    if load.get("busy"):
        advice = (f"measured while the host was busy (other processes used {load['other_cores']:.2f} of "
                  f"{load.get('cores')} cores), so this says nothing about llama-server: rerun on a quiet host, "
                  f"or pass --llamabench-retry-busy=N to measure again while it is busy")  # fmt: skip
    else:
        advice = "lower the threshold there or fix the regression"
    raise ThresholdNotMet(f"{entry.config}/{entry.workload}: threshold not met: " + "; ".join(misses)
                          + f" (set in {thresholds.source}); {advice}")  # fmt: skip
