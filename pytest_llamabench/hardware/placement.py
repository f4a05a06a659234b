"""Which GPUs and CPU cores one pytest process may give its servers: pytest-free.

Under ``pytest -n N`` (pytest-xdist) N workers run configs side by side on one host. Each
worker gets its own slice of the host so that concurrent servers never meet:

- **GPUs**: the visible devices (``discover_devices()``, which honours the user's
  ``CUDA_VISIBLE_DEVICES``), in order, cut into N equal slices of ``len(devices) // N``;
  worker k gets slice k. A leftover device (3 GPUs, ``-n 2``) is left idle. A config with
  ``gpus = g`` uses the first g devices of its worker's slice; a config that needs more
  than a slice holds fails with one error naming both numbers and the fix.
- **CPU cores**: the cores this process may run on (``os.sched_getaffinity``), grouped into
  physical cores (hyper-thread siblings stay together: on many hosts CPU n and n+16 are one
  core, and a plain split would give two workers the two halves of the same cores), cut into
  N contiguous, equal slices (the remainder goes to the first workers); the worker pins
  itself (and so its servers and its client) to its slice, and a config that does not set
  ``threads`` gets ``--threads`` = the physical cores of its slice (llama.cpp's own default
  counts physical cores too).

Without xdist (or ``-n 0``/``-n 1``) the single process keeps every device and core;
``gpus = g`` still selects the first g devices, so a one-GPU config never spreads over
two cards.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence

from pytest_llamabench.config import ServerConfig
from pytest_llamabench.errors import ConfigError, GpuUnavailable
from pytest_llamabench.hardware.device import Device


@dataclasses.dataclass(frozen=True)
class Placement:
    """What one process (xdist worker ``worker`` of ``workers``, or the only one) may use.

    ``devices``: its GPUs (``None``: no GPU was discovered; servers inherit the environment).
    ``cpus``: the cores it pins itself to (``None``: not partitioned)."""

    worker: int = 0
    workers: int = 1
    devices: tuple[Device, ...] | None = None
    cpus: tuple[int, ...] | None = None
    physical_cores: int | None = None  # of ``cpus``

    def devices_for(self, config: ServerConfig) -> tuple[Device, ...] | None:
        """The GPUs of one config: the first ``config.gpus`` of this slice."""
        if not config.gpu or self.devices is None:
            return None
        if not self.devices:
            return ()  # CUDA_VISIBLE_DEVICES hides every GPU: the launcher says so
        wanted = config.gpus
        if wanted > len(self.devices):
            share = (f"xdist worker {self.worker + 1} of {self.workers} has {len(self.devices)} of them"
                     if self.workers > 1 else f"{len(self.devices)} visible")  # fmt: skip
            fix = ("run it with fewer xdist workers (-n) so each gets more GPUs, or on a host with more GPUs"
                   if self.workers > 1 else "run it on a host with more GPUs, or lower gpus")  # fmt: skip
            raise GpuUnavailable(
                f"{config.source}.gpus: config {config.name} needs {wanted} GPUs, but {share} "
                f"({', '.join(d.uuid for d in self.devices) or 'none'}); {fix}"
            )
        return self.devices[:wanted]

    def with_threads(self, config: ServerConfig) -> ServerConfig:
        """``config`` with ``threads`` = the cores of this slice, unless it sets threads itself."""
        if self.cpus is None or "threads" in config.server:
            return config
        threads = self.physical_cores or len(self.cpus)
        return dataclasses.replace(config, server={**config.server, "threads": threads})

    def as_dict(self) -> dict[str, object]:
        return {
            "worker": self.worker,
            "workers": self.workers,
            "devices": None if self.devices is None else [d.uuid for d in self.devices],
            "cpus": None if self.cpus is None else cpu_list(self.cpus),
            "physical_cores": self.physical_cores,
        }


def split_devices(devices: Sequence[Device], workers: int) -> list[tuple[Device, ...]]:
    """``workers`` slices of ``len(devices) // workers`` devices each, in order."""
    per = len(devices) // workers
    return [tuple(devices[k * per:(k + 1) * per]) for k in range(workers)]


def physical_cores(cpus: Iterable[int], siblings: Callable[[int], Iterable[int]] | None = None) -> list[tuple[int, ...]]:
    """``cpus`` grouped by physical core (hyper-thread siblings together), ordered by lowest CPU.

    ``siblings(cpu)``: the CPUs sharing ``cpu``'s core (default: the kernel's
    ``topology/thread_siblings_list``; a CPU alone where that cannot be read)."""
    wanted = set(cpus)
    read = siblings or _thread_siblings
    groups: dict[tuple[int, ...], None] = {}
    for cpu in sorted(wanted):
        groups[tuple(sorted({cpu, *read(cpu)} & wanted))] = None
    return sorted(groups, key=min)


def split_cpus(
    cpus: Iterable[int], workers: int, siblings: Callable[[int], Iterable[int]] | None = None
) -> list[tuple[int, ...]]:
    """``workers`` slices of whole physical cores, contiguous in CPU order; the numbers of cores
    differ by at most one."""
    cores = physical_cores(cpus, siblings)
    per, extra = divmod(len(cores), workers)
    slices, at = [], 0
    for k in range(workers):
        size = per + (1 if k < extra else 0)
        slices.append(tuple(sorted(cpu for core in cores[at:at + size] for cpu in core)))
        at += size
    return slices


def _thread_siblings(cpu: int) -> list[int]:
    try:
        with open(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list") as fh:
            return parse_cpu_list(fh.read())
    except (OSError, ValueError):
        return [cpu]


def parse_cpu_list(text: str) -> list[int]:
    """The kernel's cpulist format (``0-3,8,10-11``) as a list of CPUs."""
    out: list[int] = []
    for part in text.strip().split(","):
        if part:
            low, _, high = part.partition("-")
            out += range(int(low), int(high or low) + 1)
    return out


def check_workers(workers: int, *, cpus: int, devices: Sequence[Device] | None, gpus_needed: int) -> None:
    """One error when ``workers`` concurrent servers cannot each get their own share.

    ``gpus_needed``: the most GPUs one selected config asks for (0: no GPU config selected);
    ``devices``: the visible GPUs (``None``: none discovered; GPU tests will be skipped)."""
    if workers <= 1:
        return
    if workers > cpus:
        raise ConfigError(
            f"-n {workers}: {workers} xdist workers would run {workers} llama-servers at once, but this process "
            f"may use {cpus} CPU core(s) and each server needs cores of its own; use -n {max(cpus, 1)} or fewer"
        )
    if gpus_needed and devices:
        if workers > len(devices):
            raise ConfigError(
                f"-n {workers}: {workers} xdist workers would each need a GPU of their own for the selected GPU "
                f"configs, but {len(devices)} GPU(s) are visible ({', '.join(d.uuid for d in devices)}; "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}); use -n {len(devices)} "
                "or fewer (-n auto picks one worker per GPU)"
            )


def worker_placement(
    worker: int, workers: int, *, devices: Sequence[Device] | None, cpus: Iterable[int]
) -> Placement:
    """Worker ``worker`` (0-based) of ``workers``: its GPU slice and, with several workers, its cores."""
    if not 0 <= worker < max(workers, 1):
        raise ConfigError(f"xdist worker {worker} is not one of {workers}")
    if workers <= 1:
        return Placement(0, 1, None if devices is None else tuple(devices), None)
    device_slice = None if devices is None else split_devices(devices, workers)[worker]
    mine = split_cpus(cpus, workers)[worker]
    return Placement(worker, workers, device_slice, mine, len(physical_cores(mine)))


def auto_workers(devices: Sequence[Device], gpus_needed: int, cpus: int) -> int:
    """``-n auto`` for GPU configs: one worker per ``gpus_needed`` GPUs, never more than cores."""
    return max(1, min(len(devices) // max(gpus_needed, 1), cpus))


def pin(cpus: Sequence[int] | None) -> None:
    """Pin this process (and the servers it starts later) to ``cpus``; nothing for ``None``."""
    if cpus is not None and set(cpus) != os.sched_getaffinity(0):
        os.sched_setaffinity(0, cpus)


def cpu_list(cpus: Iterable[int]) -> str:
    """``0-7,16-23``: the kernel's cpulist format."""
    parts: list[list[int]] = []
    for cpu in sorted(set(cpus)):
        if parts and cpu == parts[-1][-1] + 1:
            parts[-1].append(cpu)
        else:
            parts.append([cpu])
    return ",".join(f"{p[0]}-{p[-1]}" if len(p) > 1 else str(p[0]) for p in parts)


__all__ = ["Placement", "auto_workers", "check_workers", "cpu_list", "parse_cpu_list", "physical_cores", "pin",
           "split_cpus", "split_devices", "worker_placement"]  # fmt: skip
