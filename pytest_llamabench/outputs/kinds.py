"""Which results of a report are speed results (one server, one workload at a time).

Other features add results of their own kinds to the same report — quant quality from
llama-perplexity (``endpoint``), load levels of concurrent workloads (``workload_spec.load``) —
with tables of their own; the speed table, its charts and the winner leave them out. Read
from the JSON alone, so a report from any version is sorted the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

from pytest_llamabench.results import ResultEntry

QUALITY_ENDPOINT = "llama-perplexity"


def is_quality(entry: ResultEntry) -> bool:
    return entry.endpoint == QUALITY_ENDPOINT


def is_load(entry: ResultEntry) -> bool:
    return isinstance((entry.workload_spec or {}).get("load"), dict)


def speed_results(entries: Iterable[ResultEntry]) -> list[ResultEntry]:
    return [e for e in entries if not is_quality(e) and not is_load(e)]


__all__ = ["QUALITY_ENDPOINT", "is_load", "is_quality", "speed_results"]
