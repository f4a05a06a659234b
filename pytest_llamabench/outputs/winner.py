"""Name a winner only when it beats the runner-up beyond noise.

The unit is the server start: two fresh servers of one config differ far more (±15 % on an
H200, ±30 % on a 2-core VM) than repetitions inside one server. With several starts per
config (``restarts``) the ratio of mean generation tok/s gets a bootstrap interval over the
starts, and a winner needs that interval above 1. With one start the start-to-start noise
is not measured, so a winner needs a margin of at least ``NOISE_FLOOR``: 20 %, above the largest
ratio between two starts of one config measured on the H200 (1.18, ``docs/noise/gpu``). It was
10 % until the auto-fit search on the H200 named n_cpu_moe 13 the winner over 12 at 1.13 in one
lease after ranking them the other way round (1.11) in the one before (``docs/qwen35-run``).
On a 2-core VM single starts have differed by up to 44 % (``docs/noise``): only restarts decide there.
"""

from __future__ import annotations

import dataclasses
import random
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from pytest_llamabench.stats import percentile

NOISE_FLOOR = 0.20
CONFIDENCE = 0.95
RESAMPLES = 2000


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A config that passed every workload: its per-workload unit samples of generation tok/s."""

    config: str
    samples: Mapping[str, Sequence[float]]  # workload -> per-start medians (or repetitions with one start)
    starts: int

    @property
    def mean(self) -> float:
        return statistics.fmean(statistics.median(s) for s in self.samples.values())


@dataclasses.dataclass(frozen=True)
class WinnerVerdict:
    winner: str | None
    best: str | None
    runner_up: str | None = None
    ratio: float | None = None
    ci: tuple[float, float] | None = None
    starts: int = 1
    reason: str = ""
    partial: str | None = None
    not_compared: tuple[str, ...] = ()  # passed, but measured on other workloads than the candidates

    def line(self) -> str:
        text = self._line()
        if self.not_compared:
            text += f" (not compared, other workloads: {', '.join(self.not_compared)})"
        return text

    def _line(self) -> str:
        if self.partial:
            return f"no winner from a partial run: {self.partial}"
        if self.best is None:
            return "no winner: no config passed every workload"
        if self.runner_up is None:
            return f"WINNER: {self.best} ({self.reason})"
        ci = f", {CONFIDENCE:.0%} CI {self.ci[0]:.2f}–{self.ci[1]:.2f}" if self.ci else ""
        evidence = f"ratio {self.ratio:.2f}{ci}, {self.starts} start(s) each"
        if self.winner:
            return f"WINNER: {self.winner} beats {self.runner_up} ({evidence}); {self.reason}"
        return f"tie within noise: {self.best} ≈ {self.runner_up} ({evidence}); {self.reason}"

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "ci": list(self.ci) if self.ci else None, "line": self.line(),
                "not_compared": list(self.not_compared),
                "noise_floor": NOISE_FLOOR, "confidence": CONFIDENCE}  # fmt: skip


def decide(candidates: Sequence[Candidate], *, seed: int = 0, partial: str | None = None) -> WinnerVerdict:
    """Rank by mean generation tok/s over workloads; the top must beat the second beyond noise.
    A partial run (``partial`` says why) names no winner."""
    if partial:
        return WinnerVerdict(None, None, partial=partial)
    candidates, others = comparable(candidates)
    verdict = _decide(candidates, seed)
    return dataclasses.replace(verdict, not_compared=others) if others else verdict


def comparable(candidates: Sequence[Candidate]) -> tuple[list[Candidate], tuple[str, ...]]:
    """Configs are ranked on the same workloads only: those that ran the widest set of workloads
    (ties: the most common set). A config measured on other workloads (a vision-only config, say)
    is no rival: its mean tok/s is of other work. Returns (comparable, names left out)."""
    if not candidates:
        return [], ()
    sets = [frozenset(c.samples) for c in candidates]
    widest = max(sets, key=lambda s: (len(s), sets.count(s)))
    keep = [c for c in candidates if frozenset(c.samples) == widest]
    return keep, tuple(c.config for c in candidates if frozenset(c.samples) != widest)


def _decide(candidates: Sequence[Candidate], seed: int) -> WinnerVerdict:
    ranked = sorted(candidates, key=lambda c: c.mean, reverse=True)
    if not ranked:
        return WinnerVerdict(None, None)
    best = ranked[0]
    if len(ranked) == 1:
        return WinnerVerdict(best.config, best.config, starts=best.starts, reason="the only config that passed")
    second = ranked[1]
    ratio = best.mean / second.mean if second.mean else float("inf")
    starts = min(best.starts, second.starts)
    if starts >= 2:
        ci = _bootstrap_ratio(best, second, seed)
        won = ci[0] > 1.0
        reason = "its interval over server starts lies above 1" if won else "the interval over server starts includes 1"
        return WinnerVerdict(best.config if won else None, best.config, second.config, ratio, ci, starts, reason)
    won = ratio >= 1 + NOISE_FLOOR
    reason = (f"one server start per config: start-to-start noise is not measured, so a winner needs a "
              f"{NOISE_FLOOR:.0%} margin; measure it with --llamabench-restarts=3")  # fmt: skip
    return WinnerVerdict(best.config if won else None, best.config, second.config, ratio, None, starts, reason)


def _bootstrap_ratio(a: Candidate, b: Candidate, seed: int) -> tuple[float, float]:
    rng = random.Random(seed)
    ratios = []
    for _ in range(RESAMPLES):
        mean_a = statistics.fmean(statistics.median(rng.choices(list(s), k=len(s))) for s in a.samples.values())
        mean_b = statistics.fmean(statistics.median(rng.choices(list(s), k=len(s))) for s in b.samples.values())
        if mean_b > 0:
            ratios.append(mean_a / mean_b)
    tail = (1 - CONFIDENCE) / 2 * 100
    return percentile(ratios, tail), percentile(ratios, 100 - tail)
