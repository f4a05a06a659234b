"""Throughput against latency: the levels of each concurrent workload, one curve per config.

| Level | req/s | out tok/s | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | E2E p99 | goodput | busy slots | status |

Each level is its own result (``load-c4``); here they are put back together, in order of load,
closed-loop levels (streams) and open-loop levels (requests/s) as two series. Cells are medians
over repetitions (with several server starts, of the per-start medians).

The knee of a series is the level after which more load stops paying: the first level L whose
next level gains less than ``KNEE_MIN_GAIN`` in aggregate output tok/s while its p99 end-to-end
time grows by more than ``KNEE_LATENCY_GROWTH``. A series where that never happens has no knee
in the measured range (throughput still scales, or latency is still flat).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from pytest_llamabench.metrics import (
    AGG_TOK_S, E2E_P99_MS, GOODPUT_PCT, GOODPUT_REQ_S, ITL_P50_MS, ITL_P99_MS, REQ_S, SLOTS_BUSY_MAX, TTFT_MS,
    TTFT_P99_MS,
)  # fmt: skip
from pytest_llamabench.outputs.table import grid
from pytest_llamabench.results import ResultEntry

KNEE_MIN_GAIN = 0.10  # the next level adds less than 10 % aggregate tok/s ...
KNEE_LATENCY_GROWTH = 0.25  # ... while p99 end-to-end time grows more than 25 %
KNEE_RULE = (f"knee = the last level before one that adds < {KNEE_MIN_GAIN:.0%} aggregate tok/s while p99 "
             f"end-to-end time grows > {KNEE_LATENCY_GROWTH:.0%}")  # fmt: skip

_COLUMNS = ((REQ_S, "req/s", "{:.2f}"), (AGG_TOK_S, "out tok/s", "{:.1f}"), (TTFT_MS, "TTFT p50", "{:.0f}"),
            (TTFT_P99_MS, "TTFT p99", "{:.0f}"), (ITL_P50_MS, "ITL p50", "{:.1f}"), (ITL_P99_MS, "ITL p99", "{:.1f}"),
            (E2E_P99_MS, "E2E p99", "{:.0f}"))  # fmt: skip


def is_load(entry: ResultEntry) -> bool:
    return isinstance((entry.workload_spec or {}).get("load"), dict)


@dataclasses.dataclass
class LoadPoint:
    """One level: its result's medians."""

    workload: str
    label: str  # c4, r0.5
    closed_loop: bool
    value: float
    outcome: str | None
    metrics: dict[str, float]
    busy_host: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"workload": self.workload, "level": self.label, "closed_loop": self.closed_loop, "value": self.value,
                "outcome": self.outcome, "busy_host": self.busy_host, "medians": self.metrics}  # fmt: skip


@dataclasses.dataclass
class Knee:
    series: str  # "closed loop" or "open loop"
    level: str | None  # None: not reached in the measured range
    why: str

    def as_dict(self) -> dict[str, Any]:
        return {"series": self.series, "level": self.level, "why": self.why}


@dataclasses.dataclass
class LoadCurve:
    """The levels of one concurrent workload on one config, and the knee of each series."""

    config: str
    group: str
    spec: dict[str, Any]
    points: list[LoadPoint] = dataclasses.field(default_factory=list)

    def series(self, closed: bool) -> list[LoadPoint]:
        return sorted((p for p in self.points if p.closed_loop == closed), key=lambda p: p.value)

    def knees(self) -> list[Knee]:
        out = []
        for closed, name in ((True, "closed loop"), (False, "open loop")):
            points = [p for p in self.series(closed) if p.outcome in ("passed", "failed")]
            if len(points) >= 2:
                out.append(knee(points, name))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"config": self.config, "workload": self.group, "prompt_tokens": self.spec.get("prompt_tokens"),
                "n_predict": self.spec.get("n_predict"), "points": [p.as_dict() for p in self.series(True)]
                + [p.as_dict() for p in self.series(False)], "knees": [k.as_dict() for k in self.knees()],
                "knee_rule": KNEE_RULE}  # fmt: skip


def knee(points: list[LoadPoint], series: str) -> Knee:
    """The knee of one series of levels in order of load (see the module's docstring)."""
    for a, b in zip(points, points[1:]):
        tok_a, tok_b = a.metrics.get(AGG_TOK_S.name), b.metrics.get(AGG_TOK_S.name)
        lat_a, lat_b = a.metrics.get(E2E_P99_MS.name), b.metrics.get(E2E_P99_MS.name)
        if not tok_a or tok_b is None or not lat_a or lat_b is None:
            continue
        gain, growth = tok_b / tok_a - 1, lat_b / lat_a - 1
        if gain < KNEE_MIN_GAIN and growth > KNEE_LATENCY_GROWTH:
            return Knee(series, a.label, f"{a.label} -> {b.label}: {gain:+.0%} tok/s, {growth:+.0%} p99 end-to-end time")
    top = points[-1].label
    return Knee(series, None, f"not reached up to {top}: each step gained >= {KNEE_MIN_GAIN:.0%} tok/s "
                              f"or grew p99 end-to-end time <= {KNEE_LATENCY_GROWTH:.0%}")  # fmt: skip


def build_curves(results: Iterable[ResultEntry]) -> list[LoadCurve]:
    """One curve per (config, concurrent workload), in first-seen order; other results are skipped."""
    curves: dict[tuple[str, str], LoadCurve] = {}
    for entry in results:
        if not is_load(entry) or not entry.config or not entry.workload or entry.outcome is None:
            continue
        spec = dict(entry.workload_spec or {})
        level = spec["load"]
        key = (entry.config, str(level.get("group")))
        curve = curves.setdefault(key, LoadCurve(entry.config, key[1], spec))
        closed = level.get("concurrency") is not None
        value = float(level["concurrency"] if closed else level.get("rate") or 0.0)
        medians = {name: m for name in entry.metrics if (m := entry.median(name)) is not None}
        curve.points.append(LoadPoint(entry.workload, f"c{value:g}" if closed else f"r{value:g}", closed, value,
                                      entry.outcome, medians, bool((entry.host_load or {}).get("busy"))))  # fmt: skip
    return list(curves.values())


def render(curves: list[LoadCurve], *, markdown: bool = False) -> str:
    blocks = [_render_one(curve, markdown) for curve in curves]
    rule = f"Medians over repetitions; TTFT, ITL and E2E in ms; goodput = requests within the SLO. {KNEE_RULE}."
    return "\n\n".join(blocks) + ("\n\n" if blocks else "") + rule + "\n"


def _render_one(curve: LoadCurve, markdown: bool) -> str:
    spec, level = curve.spec, curve.spec.get("load") or {}
    slo = {k: v for k, v in (level.get("slo") or {}).items() if v is not None}
    title = (f"{curve.config} / {curve.group}: prompt {spec.get('prompt_tokens')} + {spec.get('n_predict')} tokens, "
             f"{'one shared prompt' if level.get('share_prompt') else 'distinct prompts'}"
             + (", SLO " + ", ".join(f"{k} <= {v:g}" for k, v in slo.items()) if slo else ""))  # fmt: skip
    headers = ["Level", *[label for _, label, _ in _COLUMNS], "goodput", "busy slots", "status"]
    found = curve.knees()
    knees = {k.level for k in found if k.level}
    body = []
    for point in curve.series(True) + curve.series(False):
        m = point.metrics
        cells = [point.label + (" (knee)" if point.label in knees else "")]
        cells += [fmt.format(m[metric.name]) if metric.name in m else "—" for metric, _, fmt in _COLUMNS]
        goodput = (f"{m[GOODPUT_REQ_S.name]:.2f}/s ({m[GOODPUT_PCT.name]:.0f}%)"
                   if GOODPUT_REQ_S.name in m and GOODPUT_PCT.name in m else "—")  # fmt: skip
        cells += [goodput, f"{m[SLOTS_BUSY_MAX.name]:.0f}" if SLOTS_BUSY_MAX.name in m else "—",
                  "busy host: not ranked" if point.busy_host else str(point.outcome)]  # fmt: skip
        body.append(cells)
    knee_lines = [f"{k.series} knee: {k.level or 'none'} ({k.why})" for k in found]
    if markdown:
        return "\n".join([f"**{title}**", "", *grid(headers, body, markdown=True), *([""] + knee_lines if knee_lines else [])])
    return "\n".join([title, *grid(headers, body), *knee_lines])


__all__ = ["KNEE_RULE", "Knee", "LoadCurve", "LoadPoint", "build_curves", "is_load", "knee", "render"]
