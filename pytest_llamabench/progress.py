"""Progress of a run: what the measurement says while it works, and an ETA from what has run.

Plain and pytest-free. The measurement reports through a callback (``ProgressCallback``) that
gets ``ServerReady`` (a config's server is up, with its load time) and ``Repetition`` (one
warm-up or measured round of a workload done). ``Eta`` estimates the time left of a planned run
from the tests finished so far: each remaining test takes what the finished tests of its
workload took on average (a workload not seen yet: the mean over all, scaled by its size), and
each server start still to come takes the mean load time seen; with several xdist workers the
total is shared among them.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Iterable, Mapping


@dataclasses.dataclass(frozen=True)
class ServerReady:
    instance: str  # the config's server start (``C7`` or ``C7@2``)
    load_s: float | None


@dataclasses.dataclass(frozen=True)
class Repetition:
    """Round ``index`` (1-based) of ``total`` (warm-ups included) of one workload."""

    instance: str
    workload: str
    index: int
    total: int
    warmups: int
    seconds: float

    @property
    def warmup(self) -> bool:
        return self.index <= self.warmups

    def text(self) -> str:
        if self.warmup:
            return f"{self.instance}/{self.workload}: warm-up {self.index}/{self.warmups}"
        return f"{self.instance}/{self.workload}: repetition {self.index - self.warmups}/{self.total - self.warmups}"


ProgressEvent = ServerReady | Repetition
ProgressCallback = Callable[[ProgressEvent], None]


@dataclasses.dataclass(frozen=True)
class PlannedTest:
    """One test of the plan: the server start it needs, its workload and its relative size."""

    test: str
    instance: str
    workload: str
    size: float = 1.0


def workload_size(prompt_tokens: int, n_predict: int, rounds: int, turns: int = 1) -> float:
    """Relative work of a workload: tokens through the server (prompt tokens are cheaper)."""
    return float(max(rounds, 1) * max(turns, 1) * (n_predict + prompt_tokens / 4))


class Eta:
    """Time left of a planned run, from the tests done so far."""

    def __init__(self, plan: Iterable[PlannedTest] = (), workers: int = 1) -> None:
        self.plan: dict[str, PlannedTest] = {t.test: t for t in plan}
        self.workers = max(workers, 1)
        self.done: dict[str, float] = {}  # test -> seconds of its call
        self.loads: dict[str, float] = {}  # instance -> server load seconds

    def set_plan(self, plan: Iterable[PlannedTest], workers: int | None = None) -> None:
        self.plan = {t.test: t for t in plan}
        if workers is not None:
            self.workers = max(workers, 1)

    def server_ready(self, instance: str, load_s: float | None) -> None:
        if load_s is not None and instance not in self.loads:
            self.loads[instance] = load_s

    def finished(self, test: str, seconds: float) -> None:
        self.done[test] = seconds

    @property
    def total(self) -> int:
        """Planned tests (0 without a plan: then no count is shown)."""
        return len(self.plan)

    @property
    def count(self) -> int:
        return sum(1 for t in self.done if t in self.plan) if self.plan else len(self.done)

    def remaining_s(self) -> float | None:
        """Seconds left, or None before anything finished (or without a plan)."""
        timed = [(self.plan[t], s) for t, s in self.done.items() if t in self.plan]
        if not timed:
            return None
        by_workload: dict[str, list[float]] = {}
        for test, seconds in timed:
            by_workload.setdefault(test.workload, []).append(seconds)
        per_size = sum(s for _, s in timed) / max(sum(t.size for t, _ in timed), 1e-9)
        left = [t for name, t in self.plan.items() if name not in self.done]
        seconds = sum(statistics.fmean(by_workload[t.workload]) if t.workload in by_workload else per_size * t.size
                      for t in left)  # fmt: skip
        starts = {t.instance for t in left} - set(self.loads) - {t.instance for t, _ in timed}
        if starts and self.loads:
            seconds += len(starts) * statistics.fmean(self.loads.values())
        return seconds / self.workers


def duration(seconds: float) -> str:
    """``45 s``, ``3 min 20 s``, ``1 h 05 min``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def finished_line(eta: Eta, test: PlannedTest | None, name: str, outcome: str, seconds: float,
                  gen_tok_s: float | None = None) -> str:  # fmt: skip
    """One line per finished test: ``[3/36] C7/short passed · 69.6 tok/s · 5.9 s · ETA 4 min 10 s``."""
    what = f"{test.instance}/{test.workload}" if test else name
    parts = [f"[{eta.count}/{eta.total}] {what} {outcome}" if eta.total else f"{what} {outcome}"]
    if gen_tok_s is not None:
        parts.append(f"{gen_tok_s:.1f} tok/s")
    parts.append(duration(seconds) if seconds >= 1 else f"{seconds:.1f} s")
    left = eta.remaining_s()
    if left is not None and eta.count < eta.total:
        parts.append(f"ETA {duration(left)}")
    return " · ".join(parts)


def planned_from_ids(ids: Iterable[str], instances: Iterable[str], workloads: Mapping[str, float]) -> list[PlannedTest]:
    """The matrix tests among collected test ids (``path::test[C7@2-short]``), matched on their
    parameter id; ``workloads`` maps each workload name to its size."""
    pairs = {f"{i}-{w}": (i, w) for i in instances for w in workloads}
    plan = []
    for test in ids:
        params = test.rpartition("[")[2].rstrip("]") if test.endswith("]") else ""
        match = pairs.get(params) or next((p for key, p in pairs.items() if params.startswith(f"{key}-")
                                           or params.endswith(f"-{key}") or f"-{key}-" in params), None)  # fmt: skip
        if match is not None:
            plan.append(PlannedTest(test, match[0], match[1], workloads[match[1]]))
    return plan


__all__ = ["Eta", "PlannedTest", "ProgressCallback", "ProgressEvent", "Repetition", "ServerReady", "duration",
           "finished_line", "planned_from_ids", "workload_size"]
