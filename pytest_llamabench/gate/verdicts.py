"""The verdict for every (config, workload, metric) of two reports, and for outcomes that changed.

Verdicts: ``regressed`` (past tolerance in the bad direction and significant),
``improved`` (past tolerance in the good direction and significant), ``no change``
(within tolerance, or the CI lies within it), ``inconclusive`` (past tolerance but not
significant, or too few samples), ``new`` (no baseline to compare with). A result that
passed in the base and now fails, errors, xfails, is skipped or is missing is a
``regressed`` row of metric ``outcome``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Iterable, Sequence

from pytest_llamabench.errors import ConfigError
from pytest_llamabench.gate.exact import compare_exact
from pytest_llamabench.gate.fingerprint import (
    FINGERPRINT_POLICIES,
    FingerprintMismatch,
    Mismatch,
    fingerprint_mismatches,
    refusal,
)
from pytest_llamabench.gate.rows import (
    IMPROVED, INCONCLUSIVE, NEW, NO_CHANGE, OUTCOME, REGRESSED, VERDICTS, Row, one_side_missing,
)  # fmt: skip
from pytest_llamabench.gate.statistics import bootstrap_ratio_ci, mann_whitney_u, min_exact_p, min_repetitions
from pytest_llamabench.gate.tolerances import Tolerance, Tolerances
from pytest_llamabench.metrics import METRICS, TIME_S, higher_is_better
from pytest_llamabench.results import FAILING_OUTCOMES, ResultEntry, RunReport

#: Below this many samples on either side no test or interval is computed.
MIN_SAMPLES = 3
#: Relative standard deviation of one server start's median, assumed where it cannot be
#: measured (one start per side). Measured: 4-10 % on this project's 2-core VM
#: (benchmarks/start_spread.py, docs/noise/), about 15 % on an H200.
START_NOISE = 0.08
#: z of the power a minimum detectable effect is quoted at (80 %).
_Z_POWER = 0.8416

Pair = tuple[str, str]


@dataclasses.dataclass(frozen=True)
class Comparison:
    """The verdict rows of a comparison, the fingerprint mismatches and banner notes."""

    rows: tuple[Row, ...]
    mismatches: tuple[Mismatch, ...] = ()
    notes: tuple[str, ...] = ()
    alpha: float = 0.05
    base_source: str = "base"
    new_source: str = "new"

    @property
    def regressed(self) -> bool:
        return any(row.verdict == REGRESSED for row in self.rows)

    def counts(self) -> dict[str, int]:
        return {v: n for v in VERDICTS if (n := sum(row.verdict == v for row in self.rows))}

    def summary(self) -> str:
        counts = self.counts()
        return ", ".join(f"{n} {v}" for v, n in counts.items()) if counts else "nothing to compare"


def results_by_pair(report: RunReport) -> dict[Pair, ResultEntry]:
    """The results the gate compares, by (config, workload): one per server start of each pair,
    pooled so that the start is the unit (``RunReport.per_unit``)."""
    seen: set[tuple[str, str, int | None]] = set()
    for result in report.results:
        if result.config is None or result.workload is None:
            continue  # not a matrix test: nothing to pair it with
        key = (result.config, result.workload, result.start)
        if key in seen:
            raise ConfigError(
                f"{report.source}: two results for config {key[0]!r} × workload {key[1]!r}; "
                f"a report must hold each pair once (was it merged from two runs?)"
            )
        seen.add(key)
    return {(r.config, r.workload): r for r in report.per_unit() if r.config and r.workload}


def load_report(path: str | os.PathLike[str]) -> RunReport:
    """``RunReport.load``, plus the gate's own check that each (config, workload) appears once."""
    report = RunReport.load(path)
    results_by_pair(report)
    return report


def compare(
    base: RunReport,
    new: RunReport,
    *,
    tolerances: Tolerances | None = None,
    alpha: float = 0.05,
    fingerprint: str = "refuse",
    metrics: Iterable[str] | None = None,
) -> Comparison:
    """Compare ``new`` against ``base``; raises FingerprintMismatch under policy "refuse"."""
    base_results, new_results = results_by_pair(base), results_by_pair(new)
    if not 0 < alpha < 1:
        raise ConfigError(f"alpha: {alpha} is not between 0 and 1; use e.g. --alpha 0.05")
    if fingerprint not in FINGERPRINT_POLICIES:
        raise ConfigError(
            f"--llamabench-fingerprint: {fingerprint!r} is not one of {', '.join(FINGERPRINT_POLICIES)}"
        )
    tolerances = Tolerances() if tolerances is None else tolerances
    measured = {m for results in (base_results, new_results) for r in results.values() for m in r.metrics}
    selected = _select_metrics(measured, tolerances, metrics)
    mismatches = fingerprint_mismatches(base, new)
    if mismatches and fingerprint == "refuse":
        raise FingerprintMismatch(refusal(base, new, mismatches))
    rows: list[Row] = []
    for key in sorted(base_results.keys() | new_results.keys()):
        pair = base_results.get(key), new_results.get(key)
        rows += _compare_result(*pair, key, selected, tolerances, alpha, base.kind)
    rows = [_flag(row, mismatches) for row in rows]
    notes = [f"{r.source} is from an unfinished run (finished: false)" for r in (base, new) if not r.finished]
    if mismatches:
        notes.insert(0, "fingerprints differ, rows marked * may not be comparable: " + "; ".join(map(str, mismatches)))
    return Comparison(
        rows=tuple(sorted(rows, key=Row.sort_key)),
        mismatches=tuple(mismatches),
        notes=tuple(notes),
        alpha=alpha,
        base_source=base.source,
        new_source=new.source,
    )


def _select_metrics(measured: set[str], tolerances: Tolerances, metrics: Iterable[str] | None) -> list[str]:
    if metrics is None:
        return sorted(tolerances.metrics())
    chosen = list(dict.fromkeys(metrics))
    for metric in chosen:
        if metric not in tolerances.metrics():
            raise ConfigError(
                f"--metrics: {metric!r} has no tolerance; add one, e.g. --tolerance "
                f"{metric}:{'-' if higher_is_better(metric) else '+'}10%"
            )
        if metric not in measured:
            raise ConfigError(
                f"--metrics: neither report has a metric {metric!r}; they have: {', '.join(sorted(measured)) or 'none'}"
            )
    return chosen


def _flag(row: Row, mismatches: Sequence[Mismatch]) -> Row:
    if any(m.configs is None or row.config in m.configs for m in mismatches):
        return dataclasses.replace(row, fingerprint_differs=True)
    return row


def _compare_result(
    base: ResultEntry | None,
    new: ResultEntry | None,
    key: Pair,
    metrics: Sequence[str],
    tolerances: Tolerances,
    alpha: float,
    base_kind: str,
) -> list[Row]:
    if base is not None and new is not None and base.ok and new.ok:
        rows = []
        for metric in metrics:
            tolerance = tolerances.get(key[0], key[1], metric)
            a, b = base.samples(metric), new.samples(metric)
            if tolerance is not None and (a or b):
                starts = min(int(base.extra.get("starts", 1)), int(new.extra.get("starts", 1)))
                known = METRICS.get(metric)
                if known is not None and known.deterministic:  # perplexity, KLD: no noise model (gate/exact.py)

                    rows.append(compare_exact(a, b, tolerance, config=key[0], workload=key[1], metric=metric))
                    continue
                server_noise = known is not None and known.per_repetition and known is not TIME_S
                row = compare_samples(a, b, tolerance, alpha=alpha, config=key[0], workload=key[1], metric=metric,
                                      units="starts" if starts > 1 else "repetitions",
                                      start_noise=START_NOISE if server_noise else None)  # fmt: skip
                row = _busy(row, base, new)
                if base_kind == "pytest-benchmark" and metric == TIME_S.name and row.n_base < MIN_SAMPLES:
                    row = dataclasses.replace(row, reason=row.reason + " (save samples with --benchmark-save-data)")
                rows.append(row)
        return rows
    verdict, reason = outcome_verdict(base, new)
    return [
        Row(
            config=key[0],
            workload=key[1],
            metric=OUTCOME,
            verdict=verdict,
            reason=reason,
            base_outcome=base.outcome_text if base else None,
            new_outcome=new.outcome_text if new else None,
        )
    ]


def outcome_verdict(base: ResultEntry | None, new: ResultEntry | None) -> tuple[str, str]:
    """Verdict and reason for a (config, workload) whose outcome is not passed on both sides."""
    if base is None:
        return NEW, "not in the base report"
    was = base.outcome_text
    if new is None:
        if base.ok:
            return REGRESSED, f"{was} in base, missing from the new report"
        return NO_CHANGE, f"{was} in base, missing from the new report"
    now = new.outcome_text
    message = f": {new.failure.message.splitlines()[0]}" if new.failure and new.failure.message else ""
    if base.ok:
        return REGRESSED, f"{was} → {now}{message}"
    if new.ok:
        if base.outcome == "skipped":
            return NEW, f"skipped in base, {now} now (no baseline measurements)"
        return IMPROVED, f"{was} → {now}"
    if new.outcome in FAILING_OUTCOMES and base.outcome not in FAILING_OUTCOMES:
        return REGRESSED, f"{was} → {now}{message}"
    return NO_CHANGE, f"{was} → {now}" if was != now else f"{now} in both"


def compare_samples(
    base: Sequence[float],
    new: Sequence[float],
    tolerance: Tolerance,
    *,
    alpha: float = 0.05,
    config: str = "",
    workload: str = "",
    metric: str = "",
    units: str = "repetitions",
    start_noise: float | None = None,
) -> Row:
    """The verdict for one metric from the samples of both sides.

    ``units = "starts"``: each sample is one fresh server's median, so the spread of the
    samples is the start-to-start noise. Otherwise the samples are repetitions of one server
    per side, and ``start_noise`` (a relative standard deviation) is the noise of a server
    start that they cannot show: a change smaller than it could tell apart is inconclusive.
    """
    row = Row(config, workload, metric, INCONCLUSIVE, n_base=len(base), n_new=len(new), tolerance=str(tolerance),
              units=units)  # fmt: skip
    row = _guarded(_verdict(row, base, new, tolerance, alpha), base, new, alpha, start_noise)
    if row.mde is not None and row.metric != OUTCOME:
        row = dataclasses.replace(row, reason=f"{row.reason}; detects ≥{row.mde:.0%}" if row.reason else "")
    return row


def detectable_change(sigma: float, n_base: int, n_new: int, alpha: float) -> float:
    """The relative change a comparison of n_base and n_new samples of relative spread
    ``sigma`` detects with 80 % power at ``alpha`` (two-sided, normal approximation on logs)."""
    z = statistics.NormalDist().inv_cdf(1 - alpha / 2) + _Z_POWER
    return math.expm1(z * sigma * math.sqrt(1 / n_base + 1 / n_new))


def _log_spread(values: Sequence[float]) -> tuple[float, int] | None:
    logs = [math.log(v) for v in values if v > 0]
    return (statistics.variance(logs), len(logs) - 1) if len(logs) >= 2 else None


def _guarded(row: Row, base: Sequence[float], new: Sequence[float], alpha: float, start_noise: float | None) -> Row:
    """The minimum detectable effect, and no verdict on a change within unmeasured start noise."""
    ratio = row.ratio
    if ratio is None or ratio <= 0:
        return row
    if row.units == "starts":
        spreads = [s for s in (_log_spread(base), _log_spread(new)) if s is not None]
        dof = sum(d for _, d in spreads)
        if not dof:
            return row
        sigma = math.sqrt(sum(v * d for v, d in spreads) / dof)
        return dataclasses.replace(row, mde=detectable_change(sigma, len(base), len(new), alpha))
    if start_noise is None:
        return row
    row = dataclasses.replace(row, mde=detectable_change(start_noise, 1, 1, alpha))
    z = statistics.NormalDist().inv_cdf(1 - alpha / 2)
    if row.verdict in (REGRESSED, IMPROVED) and abs(math.log(ratio)) < z * start_noise * math.sqrt(2):
        change = f"{(ratio - 1) * 100:+.1f}%"
        reason = (f"{change} is past {row.tolerance}, but one server start per side cannot tell it from "
                  f"start-to-start noise (±{start_noise:.0%}); measure with --llamabench-restarts=6")  # fmt: skip
        return dataclasses.replace(row, verdict=INCONCLUSIVE, reason=reason)
    return row


def _busy(row: Row, base: ResultEntry, new: ResultEntry) -> Row:
    """A change measured while other processes kept the host busy is not evidence either way."""
    busy = [side for side, e in (("base", base), ("new", new)) if (e.host_load or {}).get("busy")]
    if not busy or row.verdict not in (REGRESSED, IMPROVED):
        return row
    reason = f"{row.reason}, but the {' and '.join(busy)} run was measured on a busy host: not evidence"
    return dataclasses.replace(row, verdict=INCONCLUSIVE, reason=reason)


def _verdict(row: Row, base: Sequence[float], new: Sequence[float], tolerance: Tolerance, alpha: float) -> Row:
    if (missing := one_side_missing(row, base, new)) is not None:
        return missing
    base_median, new_median = statistics.median(base), statistics.median(new)
    row = dataclasses.replace(row, base_median=base_median, new_median=new_median)
    band = tolerance.band(base_median)
    if base_median == 0 or band is None:
        same = new_median == base_median
        return dataclasses.replace(row, verdict=NO_CHANGE if same else INCONCLUSIVE,
                                   reason="both medians are 0" if same else "base median is 0: no ratio")  # fmt: skip
    ratio = new_median / base_median
    row = dataclasses.replace(row, ratio=ratio)
    direction = _direction(ratio, band, tolerance.higher_is_better)
    change = f"{(ratio - 1) * 100:+.1f}%"
    need = min_repetitions(alpha)
    sizes = f"n={len(base)}/{len(new)}"
    if min(len(base), len(new)) < MIN_SAMPLES:
        if direction is None:
            return dataclasses.replace(row, verdict=NO_CHANGE, reason=f"{change} within {tolerance} ({sizes})")
        reason = f"{change} is past {tolerance} but {sizes}: need ≥{need} repetitions per side"
        return dataclasses.replace(row, reason=reason)
    p_value = mann_whitney_u(base, new).p_value
    ci = bootstrap_ratio_ci(base, new, confidence=1 - alpha)
    row = dataclasses.replace(row, p_value=p_value, ci=ci)
    significant = p_value <= alpha
    if direction is not None and significant:
        verdict = REGRESSED if direction == "bad" else IMPROVED
        return dataclasses.replace(row, verdict=verdict, reason=f"{change} is past {tolerance}, p={p_value:.2g}")
    if direction is None:
        return dataclasses.replace(row, verdict=NO_CHANGE, reason=f"{change} within {tolerance}")
    if ci is not None and band[0] <= ci[0] and ci[1] <= band[1]:
        return dataclasses.replace(row, verdict=NO_CHANGE, reason=f"{change}, but its CI is within {tolerance}")
    reason = f"{change} is past {tolerance} but not significant (p={p_value:.2g} > {alpha:g})"
    if min_exact_p(len(base), len(new)) > alpha:
        reason += f": {sizes} can never reach it, need ≥{need} repetitions per side"
    return dataclasses.replace(row, reason=reason)


def _direction(ratio: float, band: tuple[float, float], higher_better: bool) -> str | None:
    """"bad" or "good" when the ratio is outside the band, None when within."""
    if ratio < band[0]:
        return "bad" if higher_better else "good"
    if ratio > band[1]:
        return "good" if higher_better else "bad"
    return None


__all__ = [
    "IMPROVED", "INCONCLUSIVE", "MIN_SAMPLES", "NEW", "NO_CHANGE", "OUTCOME", "REGRESSED", "VERDICTS",
    "Comparison", "Row", "compare", "compare_samples", "load_report", "outcome_verdict", "results_by_pair",
]  # fmt: skip
