"""Memory bandwidth of the GPU (from NVML: memory clock × bus width) and of the host
(configured with ``LLAMABENCH_HOST_BANDWIDTH`` in GB/s, else measured once with a large copy)."""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping

from pytest_llamabench.errors import ConfigError

HOST_BANDWIDTH_ENV = "LLAMABENCH_HOST_BANDWIDTH"
_BLOCK_BYTES = 64 * 2**20


def gpu_bandwidth(index: int = 0) -> float | None:
    """Peak memory bandwidth of NVML device ``index`` in bytes/s: 2 (double data rate) × max memory
    clock × bus width / 8; None without NVML. (H200: 2 × 3201 MHz × 6144 bit / 8 ≈ 4.9 TB/s.)"""
    try:
        from pytest_llamabench.hardware.gpu import nvml_session

        with nvml_session() as nv:
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            clock_mhz = nv.nvmlDeviceGetMaxClockInfo(handle, nv.NVML_CLOCK_MEM)
            bus_bits = nv.nvmlDeviceGetMemoryBusWidth(handle)
    except Exception:  # no pynvml, no driver, an old driver without the call: no GPU roofline
        return None
    return 2.0 * clock_mhz * 1e6 * bus_bits / 8 if clock_mhz and bus_bits else None


def host_bandwidth(environ: Mapping[str, str] | None = None) -> tuple[float, str]:
    """(bytes/s, where it came from): ``LLAMABENCH_HOST_BANDWIDTH`` (GB/s), else measured."""
    env = os.environ if environ is None else environ
    value = env.get(HOST_BANDWIDTH_ENV)
    if value:
        try:
            gbs = float(value)
        except ValueError:
            gbs = -1.0
        if gbs <= 0:
            raise ConfigError(f"{HOST_BANDWIDTH_ENV}={value!r}: give the host's memory bandwidth in GB/s, e.g. 60")
        return gbs * 1e9, HOST_BANDWIDTH_ENV
    return _measured_host_bandwidth(), "measured (a 64 MiB copy per core, all cores at once, best of 3)"


@functools.cache
def _measured_host_bandwidth() -> float:
    """Bytes moved per second (read + write) by one copy thread per usable core, each copying its
    own 64 MiB block (numpy releases the GIL), best of 3: what decode on all cores can reach,
    measured once per process (about a second). Past 16 cores the blocks shrink so that all of
    them stay at 2 GiB (read + written), still far beyond any last-level cache."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    size = min(_BLOCK_BYTES, 2**30 // threads)
    blocks = [(np.ones(size, dtype=np.uint8), np.empty(size, dtype=np.uint8)) for _ in range(threads)]
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(3):
            start = time.perf_counter()
            list(pool.map(lambda pair: np.copyto(pair[1], pair[0]), blocks))
            best = min(best, time.perf_counter() - start)
    return 2 * size * threads / best


__all__ = ["HOST_BANDWIDTH_ENV", "gpu_bandwidth", "host_bandwidth"]
