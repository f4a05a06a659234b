"""Every metric, declared once: name, unit, direction, threshold key, table label, tolerance.

The measurement, the report, the table, pytest-benchmark's ``extra_info``, the thresholds
and the regression gate all take their metric names from here; nothing else spells one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

MIB = 1024 * 1024
GIB = 1024 * MIB


@dataclasses.dataclass(frozen=True)
class Metric:
    """One measured quantity.

    ``higher_is_better`` gives the direction of a regression. ``threshold`` is the key
    that sets a limit on it (``min_...`` for higher-is-better, ``max_...`` otherwise).
    ``peak`` metrics are one value per server (RSS, VRAM), read as their maximum.
    ``tolerance`` is the gate's default allowed change in the bad direction.
    """

    name: str
    unit: str
    higher_is_better: bool
    label: str
    threshold: str | None = None
    per_repetition: bool = True
    tolerance: str | None = None

    @property
    def peak(self) -> bool:
        return not self.per_repetition

    def passes(self, measured: float, limit: float) -> bool:
        return measured >= limit if self.higher_is_better else measured <= limit

    def __str__(self) -> str:
        return self.name


GEN_TOK_S = Metric("gen_tok_s", "tok/s", True, "generation tok/s", "min_gen_tok_s", tolerance="-5%")
PROMPT_TOK_S = Metric("prompt_tok_s", "tok/s", True, "prompt tok/s", "min_prompt_tok_s", tolerance="-10%")
CLIENT_GEN_TOK_S = Metric("client_gen_tok_s", "tok/s", True, "client generation tok/s")
TTFT_MS = Metric("ttft_ms", "ms", False, "time to first token", "max_ttft_ms", tolerance="+15%")
E2E_MS = Metric("e2e_ms", "ms", False, "end-to-end time")
ITL_P50_MS = Metric("itl_p50_ms", "ms", False, "inter-token latency p50")
ITL_P90_MS = Metric("itl_p90_ms", "ms", False, "inter-token latency p90")
ITL_P99_MS = Metric("itl_p99_ms", "ms", False, "inter-token latency p99")
RSS_PEAK_MIB = Metric("rss_peak_mib", "MiB", False, "RSS (MiB)", "max_rss_mib", per_repetition=False, tolerance="+5%")
VRAM_PEAK_MIB = Metric("vram_peak_mib", "MiB", False, "VRAM (MiB)", "max_vram_mib", per_repetition=False,
                       tolerance="+2%")  # fmt: skip
#: pytest-benchmark's own time per round, for plain pytest-benchmark entries read by the gate.
TIME_S = Metric("time_s", "s", False, "time per round", tolerance="+10%")

METRICS: dict[str, Metric] = {m.name: m for m in (
    GEN_TOK_S, PROMPT_TOK_S, CLIENT_GEN_TOK_S, TTFT_MS, E2E_MS, ITL_P50_MS, ITL_P90_MS, ITL_P99_MS,
    RSS_PEAK_MIB, VRAM_PEAK_MIB, TIME_S,
)}  # fmt: skip

#: Per-repetition metrics a completion or chat workload measures, in report order.
SAMPLE_METRICS = tuple(m for m in METRICS.values() if m.per_repetition and m is not TIME_S)
#: Threshold key -> metric.
THRESHOLDS: dict[str, Metric] = {m.threshold: m for m in METRICS.values() if m.threshold}
#: The gate's default tolerances, as ``METRIC:±N%`` specs.
DEFAULT_TOLERANCES = tuple(f"{m.name}:{m.tolerance}" for m in METRICS.values() if m.tolerance)


def get(name: str) -> Metric | None:
    return METRICS.get(name)


def higher_is_better(name: str) -> bool:
    """Direction of a metric; unknown names (a user's own extra_info) follow the ``_tok_s`` suffix."""
    metric = METRICS.get(name)
    return metric.higher_is_better if metric is not None else name.endswith("_tok_s")


def iter_metrics() -> Iterator[Metric]:
    return iter(METRICS.values())


__all__ = ["GIB", "METRICS", "MIB", "Metric", "SAMPLE_METRICS", "THRESHOLDS", "get", "higher_is_better"]
