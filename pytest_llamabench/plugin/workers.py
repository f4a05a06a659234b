"""Several configs at once under pytest-xdist: which worker is this, what may it use, and how
tests are grouped so that a config's workloads stay on one worker.

The logic is in ``hardware.placement`` (pytest-free); this module reads pytest's and xdist's
settings: ``workerinput["workerid"]``/``["workercount"]`` on a worker, ``-n``/``--dist`` on
the controller.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pytest

from pytest_llamabench.config import ServerConfig
from pytest_llamabench.errors import ConfigError, GpuUnavailable
from pytest_llamabench.hardware.device import Device
from pytest_llamabench.hardware.placement import (
    Placement,
    auto_workers,
    check_workers,
    cpu_list,
    physical_cores,
    worker_placement,
)

#: ``--dist`` modes that would run one config's tests on several workers (two servers for
#: one config, racing for one GPU) or every test on every worker.
SPLITTING_DIST = ("worksteal", "each")


def gpus_needed(configs: Iterable[ServerConfig]) -> int:
    """The most GPUs one selected config asks for; 0 when none is a GPU config."""
    return max((c.gpus for c in configs if c.gpu), default=0)


def discover(configs: Sequence[ServerConfig]) -> list[Device] | None:
    """The visible GPUs when a selected config needs one; ``None`` without NVML or a GPU config
    (GPU tests are then skipped with the reason, as before)."""
    if not gpus_needed(configs):
        return None
    from pytest_llamabench.hardware import gpu

    try:
        return gpu.discover_devices()
    except GpuUnavailable:
        return None


def xdist_workers(config: pytest.Config) -> int:
    """How many xdist workers the controller starts (0 without xdist or with -n 0)."""
    if config.getoption("dist", "no") == "no":
        return 0
    return len(config.getoption("tx", None) or [])


def worker_of(config: pytest.Config) -> tuple[int, int]:
    """(index, count) of this xdist worker; (0, 1) for the controller or the only process."""
    workerinput = getattr(config, "workerinput", None)
    if not workerinput:
        return 0, 1
    workerid = str(workerinput.get("workerid", "gw0"))
    count = int(workerinput.get("workercount", 1))
    return int(workerid.removeprefix("gw") or 0), max(count, 1)


def placement(config: pytest.Config, configs: Sequence[ServerConfig]) -> Placement:
    """This process's GPUs and cores (see ``hardware.placement``)."""
    index, count = worker_of(config)
    return worker_placement(index, count, devices=discover(configs), cpus=os.sched_getaffinity(0))


def check_controller(config: pytest.Config, configs: Sequence[ServerConfig]) -> None:
    """Controller: one error for -n or --dist values that cannot give each server its own share."""
    workers = xdist_workers(config)
    if workers <= 1:
        return
    dist = config.getoption("dist", "no")
    if dist in SPLITTING_DIST:
        raise ConfigError(
            f"--dist {dist} would run one config's workloads on several xdist workers (a server per worker, "
            "racing for the same GPU); leave --dist out (pytest-llamabench then keeps each config on one "
            "worker) or use --dist loadgroup"
        )
    cores = len(physical_cores(os.sched_getaffinity(0)))
    check_workers(workers, cpus=cores, devices=discover(configs), gpus_needed=gpus_needed(configs))


def describe_workers(config: pytest.Config, configs: Sequence[ServerConfig]) -> str | None:
    """Controller: one line saying what each xdist worker gets (None without several workers)."""
    workers = xdist_workers(config)
    if workers <= 1 or not configs:
        return None
    devices, cpus = discover(configs), os.sched_getaffinity(0)
    shares = []
    for k in range(workers):
        place = worker_placement(k, workers, devices=devices, cpus=cpus)
        gpus = f"GPU {', '.join(str(d.index) for d in place.devices) or 'none'}, " if place.devices is not None else ""
        shares.append(f"gw{k}: {gpus}cores {cpu_list(place.cpus or ())} ({place.physical_cores} physical)")
    return f"{workers} xdist workers, one config at a time each: " + "; ".join(shares)


def auto_num_workers(configs: Sequence[ServerConfig]) -> int | None:
    """``-n auto`` with GPU configs selected: one worker per GPU (per ``gpus`` of the largest
    config); ``None`` (xdist's default, one per CPU) otherwise."""
    devices = discover(configs)
    if not devices:
        return None
    return auto_workers(devices, gpus_needed(configs), len(physical_cores(os.sched_getaffinity(0))))


def config_group(nodeid: str, instances: Iterable[str]) -> str | None:
    """The config start (``C7``, ``C7@2``) a matrix test's node id belongs to, or None.

    The parameter id is ``INSTANCE-WORKLOAD`` (plus any ids of the user's own parameters);
    the longest instance found between ``-`` separators wins (``kv-q8`` over ``kv``)."""
    if "[" not in nodeid or "]" not in nodeid:
        return None
    params = f"-{nodeid[nodeid.index('[') + 1:nodeid.rindex(']')]}-"
    found = [i for i in instances if f"-{i}-" in params]
    return max(found, key=len) if found else None


def make_scheduler(config: pytest.Config, log: Any, instances: Callable[[], Iterable[str]]) -> Any:
    """xdist's LoadScope scheduling with one scope per config start: a config's tests go to
    one worker, different configs to different workers; other tests are scheduled one by one.

    pytest-xdist's own ``--dist loadgroup`` marks groups by changing node ids, which pytest
    9.2 no longer honours (pytest-xdist#1386): tests of one group then land on several
    workers. Grouping here reads the config from the node id instead."""
    from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

    known = list(instances())

    class ConfigScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            group = config_group(nodeid, known)
            return f"llamabench-config::{group}" if group is not None else nodeid

    return ConfigScheduling(config, log)


__all__ = ["auto_num_workers", "check_controller", "describe_workers", "config_group", "gpus_needed", "make_scheduler", "placement",
           "worker_of", "xdist_workers"]  # fmt: skip
