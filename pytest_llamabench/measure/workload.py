"""Run a workload against a server: warm up, repeat, and keep one Sample per repetition."""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable
from typing import Any, Protocol

from pytest_llamabench.config import Workload
from pytest_llamabench.errors import RequestFailed
from pytest_llamabench.measure.kinds import KINDS
from pytest_llamabench.measure.sample import Prompts, Sample
from pytest_llamabench.progress import ProgressCallback, Repetition
from pytest_llamabench.metrics import RSS_PEAK_MIB, SAMPLE_METRICS, VRAM_PEAK_MIB, Metric
from pytest_llamabench.stats import Summary
from pytest_llamabench.server.launcher import Server

Runner = Callable[[Callable[[], None], int, int], None]
"""``runner(one_round, rounds, warmup_rounds)``: e.g. pytest-benchmark's pedantic."""


class WorkloadKind(Protocol):
    def run_once(self, server: Server, workload: Workload, prompts: Prompts, index: int) -> Sample: ...

    def endpoint(self, prompts: Prompts) -> str: ...


def kind(name: str) -> WorkloadKind:
    module: WorkloadKind = importlib.import_module(KINDS[name])
    return module


@dataclasses.dataclass
class Measurement:
    """All repetitions of one workload on one server (warmups excluded)."""

    config: str
    workload: str
    samples: list[Sample]
    warmups: int
    rss_peak_mib: float | None = None
    vram_peak_mib: float | None = None
    endpoint: str = "/completion"
    #: what a repetition measures: a kind module's ``METRICS`` (a load level has more), else these
    sample_metrics: tuple[Metric, ...] = SAMPLE_METRICS
    #: what the kind recorded besides numbers (its optional ``facts(server, workload)``): e.g. the
    #: sampling parameters the server used, a chat template check
    facts: dict[str, Any] = dataclasses.field(default_factory=dict)

    def metrics(self) -> dict[str, Summary]:
        out = {}
        for m in self.sample_metrics:  # a metric a repetition could not measure (None) is left out
            values = [v for s in self.samples if (v := getattr(s, m.name)) is not None]
            if values:
                out[m.name] = Summary.of(values)
        for metric, value in ((RSS_PEAK_MIB, self.rss_peak_mib), (VRAM_PEAK_MIB, self.vram_peak_mib)):
            if value is not None:
                out[metric.name] = Summary.of([value])
        return out


def run_workload(
    server: Server, workload: Workload, *, runner: Runner | None = None, timeout_s: float | None = None,
    progress: ProgressCallback | None = None,
) -> Measurement:
    """Warm up, repeat, and collect one Sample per repetition.

    ``timeout_s`` (the command line's) overrides the workload's request timeout; ``progress``
    hears of every round done (``progress.Repetition``)."""
    workload_kind = kind(workload.kind)
    client = server.client
    client.request_timeout_s = timeout_s or workload.request_timeout_s()
    client.timeout_hint = (
        "raise --llamabench-request-timeout" if timeout_s else
        f"raise timeout_s in {workload.source or f'[workloads.{workload.name}]'} (or pass --llamabench-request-timeout)"
    )  # fmt: skip
    rounds_done = 0
    samples: list[Sample] = []
    prompts = Prompts(server, workload.prompt_tokens * workload.turns * 4)

    def one_round() -> None:
        nonlocal rounds_done
        index = rounds_done
        rounds_done += 1
        began = time.monotonic()
        try:
            sample = workload_kind.run_once(server, workload, prompts, index)
        except RequestFailed:
            server.ensure_alive()  # a dead server is the real cause: say that instead
            raise
        if index >= workload.warmup:
            samples.append(sample)
        if progress is not None:
            progress(Repetition(server.config.instance, workload.name, index + 1, workload.warmup + workload.repetitions,
                                workload.warmup, time.monotonic() - began))  # fmt: skip

    if runner is not None:
        runner(one_round, workload.repetitions, workload.warmup)
    # pytest-benchmark runs a round only once when it is disabled (e.g. under xdist):
    # finish the warmups and repetitions ourselves so the numbers are the same either way.
    while len(samples) < workload.repetitions:
        one_round()
    return Measurement(server.config.name, workload.name, samples, workload.warmup,
                       endpoint=workload_kind.endpoint(prompts),
                       sample_metrics=getattr(workload_kind, "METRICS", SAMPLE_METRICS),
                       facts=_facts(workload_kind, server, workload))  # fmt: skip


def _facts(workload_kind: WorkloadKind, server: Server, workload: Workload) -> dict[str, Any]:
    facts = getattr(workload_kind, "facts", None)  # optional in a kind module
    return dict(facts(server, workload)) if facts is not None else {}


__all__ = ["Measurement", "Runner", "run_workload"]
