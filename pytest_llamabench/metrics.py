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
    ``deterministic`` metrics (perplexity, KL divergence) are the same on every run of a fixed
    build, model and corpus: the gate compares them exactly, within the tolerance, never with
    the speed noise model.
    """

    name: str
    unit: str
    higher_is_better: bool
    label: str
    threshold: str | None = None
    per_repetition: bool = True
    tolerance: str | None = None
    deterministic: bool = False

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
ITL_P99_MS = Metric("itl_p99_ms", "ms", False, "inter-token latency p99", "max_itl_p99_ms")
RSS_PEAK_MIB = Metric("rss_peak_mib", "MiB", False, "RSS (MiB)", "max_rss_mib", per_repetition=False, tolerance="+5%")
VRAM_PEAK_MIB = Metric("vram_peak_mib", "MiB", False, "VRAM (MiB)", "max_vram_mib", per_repetition=False,
                       tolerance="+2%")  # fmt: skip
# Concurrent load (measure/load.py): one repetition is all of a level's requests; the latency
# metrics above are then percentiles over its requests (ttft_ms and e2e_ms: their median).
AGG_TOK_S = Metric("agg_tok_s", "tok/s", True, "aggregate output tok/s", "min_agg_tok_s", tolerance="-5%")
REQ_S = Metric("req_s", "req/s", True, "requests/s", "min_req_s")
TTFT_P99_MS = Metric("ttft_p99_ms", "ms", False, "time to first token p99", "max_ttft_p99_ms", tolerance="+20%")
E2E_P99_MS = Metric("e2e_p99_ms", "ms", False, "end-to-end time p99", "max_e2e_p99_ms")
GOODPUT_REQ_S = Metric("goodput_req_s", "req/s", True, "goodput (requests/s within the SLO)", "min_goodput_req_s")
GOODPUT_PCT = Metric("goodput_pct", "%", True, "requests within the SLO", "min_goodput_pct")
SLOTS_BUSY_MAX = Metric("slots_busy_max", "slots", True, "busy server slots (max)")
SLOTS_BUSY_MEAN = Metric("slots_busy_mean", "slots", True, "busy server slots (mean)")
GEN_OVERLAP_MAX = Metric("gen_overlap_max", "requests", True, "requests generating at once (max, client)")
# Vision and thinking (measure/vision.py, measure/chat.py): per repetition, when the kind measures them.
IMAGE_ENCODE_MS = Metric("image_encode_ms", "ms", False, "image encode time (server)", "max_image_encode_ms",
                         tolerance="+15%")  # fmt: skip
REASONING_TOKENS = Metric("reasoning_tokens", "tokens", False, "reasoning tokens (reasoning_content)")
ANSWER_TOKENS = Metric("answer_tokens", "tokens", True, "answer tokens (content)")
# Quant quality (quality/, kind = "perplexity"): one deterministic value per run of llama-perplexity.
PPL = Metric("ppl", "", False, "perplexity", tolerance="+0.1%", deterministic=True)
PPL_ERROR = Metric("ppl_error", "", False, "perplexity ± (llama-perplexity's uncertainty)", deterministic=True)
PPL_INCREASE_PCT = Metric("ppl_increase_pct", "%", False, "PPL vs reference", "max_ppl_increase_pct",
                          deterministic=True)  # fmt: skip
KLD_MEAN = Metric("kld_mean", "", False, "mean KL divergence", "max_kld_mean", tolerance="+1%", deterministic=True)
KLD_MEDIAN = Metric("kld_median", "", False, "median KL divergence", deterministic=True)
KLD_P99 = Metric("kld_p99", "", False, "KL divergence p99", deterministic=True)
KLD_MAX = Metric("kld_max", "", False, "maximum KL divergence", deterministic=True)
SAME_TOP_P_PCT = Metric("same_top_p_pct", "%", True, "same top token", "min_same_top_p", tolerance="-0.1",
                        deterministic=True)  # fmt: skip
RMS_DP_PCT = Metric("rms_dp_pct", "%", False, "RMS Δp", deterministic=True)
QUALITY_METRICS = (PPL, PPL_ERROR, PPL_INCREASE_PCT, KLD_MEAN, KLD_MEDIAN, KLD_P99, KLD_MAX, SAME_TOP_P_PCT, RMS_DP_PCT)
#: pytest-benchmark's own time per round, for plain pytest-benchmark entries read by the gate.
TIME_S = Metric("time_s", "s", False, "time per round", tolerance="+10%")

METRICS: dict[str, Metric] = {m.name: m for m in (
    GEN_TOK_S, PROMPT_TOK_S, CLIENT_GEN_TOK_S, TTFT_MS, E2E_MS, ITL_P50_MS, ITL_P90_MS, ITL_P99_MS,
    RSS_PEAK_MIB, VRAM_PEAK_MIB, TIME_S, AGG_TOK_S, REQ_S, TTFT_P99_MS, E2E_P99_MS, GOODPUT_REQ_S, GOODPUT_PCT,
    SLOTS_BUSY_MAX, SLOTS_BUSY_MEAN, GEN_OVERLAP_MAX, IMAGE_ENCODE_MS, REASONING_TOKENS, ANSWER_TOKENS,
    *QUALITY_METRICS,
)}  # fmt: skip

#: Per-repetition metrics a completion or chat workload measures, in report order.
SAMPLE_METRICS = (GEN_TOK_S, PROMPT_TOK_S, CLIENT_GEN_TOK_S, TTFT_MS, E2E_MS, ITL_P50_MS, ITL_P90_MS, ITL_P99_MS)
#: Per-repetition metrics of a concurrent load level (measure/load.py), in report order.
LOAD_METRICS = (AGG_TOK_S, REQ_S, *SAMPLE_METRICS, TTFT_P99_MS, E2E_P99_MS, GOODPUT_REQ_S, GOODPUT_PCT,
                SLOTS_BUSY_MAX, SLOTS_BUSY_MEAN, GEN_OVERLAP_MAX)  # fmt: skip
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


__all__ = ["GIB", "LOAD_METRICS", "METRICS", "MIB", "Metric", "SAMPLE_METRICS", "THRESHOLDS", "get", "higher_is_better"]
