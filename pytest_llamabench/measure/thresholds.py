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
            shown = f"{measured:.4g}" if metric.deterministic else f"{measured:.1f}"  # KLD 0.0123 is not 0.0
            misses.append(f"{metric} {'peak' if metric.peak else 'median'} {shown}{' ' + unit if unit else ''}, "
                          f"required {key} = {limit:g}{' ' + unit if unit else ''}")  # fmt: skip
    if not misses:
        return
    load = entry.host_load or {}
    if load.get("busy"):
        what = f"other processes used {load.get('other_cores') or 0:.2f} of {load.get('cores')} cores"
        if load.get("gpu_contended_samples"):
            what += f"; other processes used the GPU ({load.get('gpu_foreign_pids')})"
        if load.get("gpu_throttled_samples"):
            what += f"; GPU clocks were throttled ({', '.join(load.get('gpu_throttle_reasons') or [])})"
        advice = (f"measured while the host was busy ({what}), so this says nothing about llama-server: "
                  f"rerun on a quiet host, or pass --llamabench-retry-busy=N to measure again while it is busy")  # fmt: skip
    else:
        advice = "lower the threshold there or fix the regression"
    raise ThresholdNotMet(f"{entry.config}/{entry.workload}: threshold not met: " + "; ".join(misses)
                          + f" (set in {thresholds.source}); {advice}")  # fmt: skip
