"""Concurrent load in the matrix: a workload's ``concurrency``, ``rate``, ``requests``,
``share_prompt``, ``slo`` and ``seed`` keys, validated into one ``LoadLevel`` per level.

A workload with ``concurrency = [1, 2, 4, 8]`` (closed loop: N streams, each sending its next
request when its previous one ends) and/or ``rate = [0.5, 1, 2]`` (open loop: Poisson arrivals
at R requests/s, seeded) becomes one workload per level, ``load-c4`` or ``load-r0.5``: each
level is its own test, result, thresholds and gate row; ``outputs.load_table`` puts the levels
of a workload back together as one throughput-vs-latency curve.

Every error names the file and the dotted key and says how to fix it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pytest_llamabench.config_toml import Table
from pytest_llamabench.errors import ConfigError

#: The keys a workload table may add for concurrent load.
LOAD_KEYS = ("concurrency", "rate", "requests", "share_prompt", "slo", "seed")
#: What a request must meet to count towards goodput.
SLO_KEYS = ("ttft_ms", "itl_ms", "e2e_ms")
#: Requests per repetition when ``requests`` is not set: each closed-loop stream sends this many ...
REQUESTS_PER_STREAM = 4
#: ... and an open-loop level sends this many.
OPEN_LOOP_REQUESTS = 16


@dataclasses.dataclass(frozen=True)
class Slo:
    """Service-level objectives of one request: time to first token, its mean gap between
    tokens (what vLLM calls TPOT) and its end-to-end time; None is no objective."""

    ttft_ms: float | None = None
    itl_ms: float | None = None
    e2e_ms: float | None = None

    def met(self, ttft_ms: float, itl_ms: float, e2e_ms: float) -> bool:
        return all(limit is None or value <= limit
                   for value, limit in ((ttft_ms, self.ttft_ms), (itl_ms, self.itl_ms), (e2e_ms, self.e2e_ms)))  # fmt: skip

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.ttft_ms, self.itl_ms, self.e2e_ms))


@dataclasses.dataclass(frozen=True)
class LoadLevel:
    """One level of a concurrent workload: ``concurrency`` streams (closed loop) or ``rate``
    requests/s (open loop), ``requests`` requests per repetition."""

    group: str  # the [workloads.X] name this level came from
    concurrency: int | None = None
    rate: float | None = None
    requests: int = 16
    share_prompt: bool = False
    slo: Slo = Slo()
    seed: int = 0
    source: str = ""  # where the level was set: file:workloads.X.concurrency

    @property
    def closed_loop(self) -> bool:
        return self.concurrency is not None

    @property
    def value(self) -> float:
        """The level's load on its axis: streams, or requests/s."""
        return float(self.concurrency) if self.concurrency is not None else float(self.rate or 0.0)

    @property
    def suffix(self) -> str:
        return f"c{self.concurrency}" if self.concurrency is not None else f"r{self.rate:g}"

    @property
    def in_flight(self) -> int:
        """The most requests this level can have in flight at once, as far as the client knows."""
        return self.concurrency if self.concurrency is not None else self.requests


def has_load(table: Table) -> bool:
    return any(key in table.data for key in ("concurrency", "rate"))


def load_levels(table: Table, group: str) -> list[LoadLevel]:
    """The levels of a workload table with ``concurrency`` and/or ``rate`` (none if it has neither)."""
    concurrency = _levels(table, "concurrency", int)
    rate = _levels(table, "rate", float)
    if not concurrency and not rate:
        for key in ("requests", "share_prompt", "slo", "seed"):
            if key in table.data:
                raise ConfigError(
                    f"{table.at(key)}: only concurrent workloads take {key}; add concurrency = [1, 2, 4] "
                    "or rate = [0.5, 1] to this workload, or remove the key"
                )
        return []
    requests = table.positive_int("requests")
    if requests is not None and concurrency and requests < max(concurrency):
        raise ConfigError(
            f"{table.at('requests')}: {requests} requests cannot keep {max(concurrency)} streams busy; "
            f"set requests >= {max(concurrency)} (the largest concurrency), or leave it out "
            f"({REQUESTS_PER_STREAM} per stream)"
        )
    slo_table = table.table("slo")
    slo_table.check_keys(SLO_KEYS)
    limits: dict[str, Any] = {}
    for key in SLO_KEYS:
        value = slo_table.get(key, float)
        if value is not None and value <= 0:
            raise ConfigError(f"{slo_table.at(key)}: must be > 0 milliseconds, got {value:g}")
        limits[key] = value
    common: Mapping[str, Any] = {
        "group": group,
        "share_prompt": table.get("share_prompt", bool, False),
        "slo": Slo(**limits),
        "seed": table.get("seed", int, 0),
    }
    levels = [LoadLevel(concurrency=n, requests=requests or REQUESTS_PER_STREAM * n,
                        source=table.at("concurrency"), **common) for n in concurrency]  # fmt: skip
    levels += [LoadLevel(rate=r, requests=requests or OPEN_LOOP_REQUESTS, source=table.at("rate"), **common)
               for r in rate]  # fmt: skip
    return levels


def _levels(table: Table, key: str, kind: type) -> list[Any]:
    value = table.get(key, (list, int, float) if kind is float else (list, int))
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ConfigError(f"{table.at(key)}: empty; give at least one level, e.g. {key} = [1, 2, 4]")
    out: list[Any] = []
    for i, item in enumerate(items):
        ok = isinstance(item, (int, float) if kind is float else int) and not isinstance(item, bool)
        if not ok:
            raise ConfigError(f"{table.at(key)}[{i}]: expected {'a number' if kind is float else 'an integer'}, got {item!r}")
        if item <= 0:
            what = "streams" if key == "concurrency" else "requests/s"
            raise ConfigError(f"{table.at(key)}[{i}]: {item} {what} sends nothing; every level must be > 0")
        if kind(item) in out:
            raise ConfigError(f"{table.at(key)}[{i}]: level {item} is listed twice; list each level once")
        out.append(kind(item))
    return sorted(out)


__all__ = ["LOAD_KEYS", "LoadLevel", "SLO_KEYS", "Slo", "has_load", "load_levels"]
