"""Facts about this host: CPU, cores, memory, and what other processes are doing to them."""

from __future__ import annotations

import os
import platform
import sys
import time
from collections.abc import Callable
from typing import Any

from pytest_llamabench.metrics import MIB

_CPU_FLAGS = ("avx", "avx2", "fma", "f16c", "avx512f")


def host_memory_bytes() -> int:
    """Physical memory plus swap, the most the host could ever give one process."""
    values: dict[str, int] = {}
    with open("/proc/meminfo") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            values[name] = int(rest.split()[0]) * 1024
    return values.get("MemTotal", 0) + values.get("SwapTotal", 0)


def host_fingerprint() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = [f for f in line.split(":", 1)[1].split() if f in _CPU_FLAGS]
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "memory_mib": round(host_memory_bytes() / MIB),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
    }


_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _host_cpu_seconds() -> tuple[float, float]:
    """(busy, steal) CPU seconds since boot of the cores this process may run on: the whole host
    (/proc/stat's first line), or only the ``cpuN`` lines of its affinity when it is pinned to a
    share (an xdist worker, ``hardware.placement``), so servers of other workers on other cores
    do not count as contention.

    Busy is user + nice + system + irq + softirq (+ steal: time a hypervisor gave to others)."""
    mine = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
    busy = steal_total = 0
    with open("/proc/stat") as fh:
        lines = [line.split() for line in fh if line.startswith("cpu")]
    cores = [f for f in lines[1:] if f[0][3:].isdecimal()]
    pinned = bool(mine) and len(mine) < len(cores)
    for fields in [f for f in cores if int(f[0][3:]) in mine] if pinned else lines[:1]:
        values = [int(v) for v in fields[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (values + [0] * 8)[:8]
        busy += user + nice + system + irq + softirq + steal
        steal_total += steal
    return busy / _CLK_TCK, steal_total / _CLK_TCK


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), 0.0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class CpuContention:
    """How much CPU *other* processes took while something was measured.

    The host's busy time minus the server's own CPU time and this process's, over the wall
    time, in cores: 0.0 on a quiet host, 1.0 when another process kept one core busy. A
    hypervisor's steal time counts as contention. ``pids()`` gives the server's host PIDs.
    """

    def __init__(self, pids: Callable[[], set[int]], busy_cores: float = 0.25) -> None:
        self._pids = pids
        self.busy_cores = busy_cores
        self.other_cores: float | None = None
        self.steal_cores: float | None = None

    def _own(self) -> float:
        return sum(process_cpu_seconds(pid) for pid in {os.getpid(), *self._pids()})

    def __enter__(self) -> CpuContention:
        self._wall = time.monotonic()
        self._host, self._steal = _host_cpu_seconds()
        self._mine = self._own()
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._wall
        host, steal = _host_cpu_seconds()
        if wall > 0:
            other = (host - self._host) - (self._own() - self._mine)
            self.other_cores = max(other, 0.0) / wall
            self.steal_cores = (steal - self._steal) / wall

    @property
    def busy(self) -> bool:
        return self.other_cores is not None and self.other_cores > self.busy_cores

    def as_dict(self) -> dict[str, Any]:
        return {"other_cores": _round(self.other_cores), "steal_cores": _round(self.steal_cores),
                "busy_cores": self.busy_cores, "busy": self.busy, "cores": _cores()}  # fmt: skip


def _cores() -> int | None:
    """The cores this process may run on (its xdist share), else the host's."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
