"""VRAM of a server's processes, sampled through NVML while it runs, and what else is on its GPUs.

The sampler also counts samples in which another process used one of the devices, or a
device's clocks were throttled: a measurement taken then is marked busy.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from types import ModuleType, TracebackType
from typing import Any

from pytest_llamabench.hardware.device import Device
from pytest_llamabench.hardware.gpu import (
    _NVML_ERROR_FUNCTION_NOT_FOUND,
    MIB,
    REASON_NO_DEVICE,
    _is_nvml_error,
    _open_nvml,
    _optional,
    _shutdown,
    _text,
    describe_nvml_error,
)

#: Clock-event (throttle) reasons that slow a measurement down: NVML's nvmlClocksEventReason*
#: bits, except idle (0x1), application clocks (0x2) and display clocks (0x100).
THROTTLE_REASONS = {0x4: "sw-power-cap", 0x8: "hw-slowdown", 0x20: "sw-thermal", 0x40: "hw-thermal",
                    0x80: "power-brake"}  # fmt: skip

METHOD_PER_PROCESS = "per-process"
METHOD_DEVICE_DELTA = "device-delta"


class VramSampler:
    """Samples the GPU memory that a server's processes use, every ``interval`` seconds.

    ``pids()`` returns the PIDs to count, as NVML sees them (host PIDs for a container).
    ``devices``: sample only those (looked up by UUID); ``None``: every device NVML sees.
    Each sample takes one of two methods, reported as ``method``:

    - ``"per-process"``: the sum of NVML ``usedGpuMemory`` of those PIDs, over the devices.
    - ``"device-delta"``: when none of those PIDs appears in NVML's list with a known
      ``usedGpuMemory`` (a VM or container where NVML reports PIDs of another namespace,
      or a driver that does not report per-process memory), the devices' total used memory
      minus the baseline read at ``start()``. That counts *every* process, so anything else
      that allocates after ``start()`` is counted too: start the sampler after any
      ``VramBallast`` is acquired.

    A sample where ``pids()`` is empty (server not started or gone) records 0 MiB.
    ``peak_mib`` and ``current_mib`` are ``None`` when NVML is unavailable (``reason`` says why)
    and before the first sample. ``peak_by_device`` / ``current_by_device`` hold the same per
    device (keyed by UUID; NVML index as text if a device has none), by the same method as the
    sample's total; each device's peak is its own highest sample, not its share of the summed
    peak. Vanished processes are simply absent from NVML's list; errors of NVML or of
    ``pids()`` during a sample are counted in ``errors`` (``last_error``) and that sample is
    skipped.
    """

    def __init__(
        self, pids: Callable[[], set[int]], interval: float = 0.2, devices: Sequence[Device] | None = None
    ) -> None:
        if interval <= 0:
            raise ValueError(f"VramSampler interval must be > 0 s, got {interval}")
        self._pids = pids
        self.interval = interval
        self.devices: tuple[Device, ...] | None = None if devices is None else tuple(devices)
        self.available = False
        self.reason = "not started"
        self.current_mib: float | None = None
        self.peak_mib: float | None = None
        self.baseline_mib: float | None = None
        self.current_by_device: dict[str, float] = {}
        self.peak_by_device: dict[str, float] = {}
        self.baseline_by_device: dict[str, float] = {}
        self.method: str | None = None  # method of the latest sample that measured memory
        self.peak_method: str | None = None
        self.samples = 0
        #: samples in which another process used one of the devices, or a device was throttled
        self.contended_samples = 0
        self.throttled_samples = 0
        self.foreign_pids: set[int] = set()
        self.throttle_reasons: set[str] = set()
        self._foreign: set[int] = set()  # of the sample being taken
        self._throttled: set[str] = set()
        self.errors = 0
        self.last_error = ""
        self._nv: ModuleType | None = None
        self._handles: list[tuple[str, Any]] = []  # (key: UUID, handle)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # lifecycle

    def start(self) -> VramSampler:
        """Open NVML, read the baseline, take a first sample, start the daemon thread.

        Never raises for a missing GPU: then ``available`` is False and nothing runs.
        """
        if self._thread is not None:
            raise RuntimeError("VramSampler already started")
        if not self._open():
            return self
        self.sample_once()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="llamabench-vram-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread and close NVML; the readings stay. Safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10 * self.interval + 5)
            self._thread = None
        if self._nv is not None:
            _shutdown(self._nv)
            self._nv = None
            self._handles = []

    def __enter__(self) -> VramSampler:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _open(self) -> bool:
        if self.devices is not None and not self.devices:
            self.available, self.reason = False, "no device selected"
            return False
        try:
            nv = _open_nvml()
        except Exception as exc:
            self.available, self.reason = False, describe_nvml_error(exc)
            return False
        try:
            handles = self._lookup(nv)
            baseline = {key: self._device_used(nv, h) / MIB for key, h in handles}
        except Exception as exc:
            _shutdown(nv)
            if not _is_nvml_error(nv, exc):
                raise
            self.available, self.reason = False, describe_nvml_error(exc)
            if self.devices is not None:
                self.reason += f" (looking up {', '.join(d.uuid for d in self.devices)})"
            return False
        if not handles:
            _shutdown(nv)
            self.available, self.reason = False, REASON_NO_DEVICE
            return False
        self._nv, self._handles = nv, handles
        self.available, self.reason = True, f"sampling {len(handles)} device(s)"
        self.baseline_by_device = baseline
        self.baseline_mib = sum(baseline.values())
        return True

    def _lookup(self, nv: ModuleType) -> list[tuple[str, Any]]:
        """(UUID, handle) of each device to sample."""
        if self.devices is not None:
            return [(d.uuid, nv.nvmlDeviceGetHandleByUUID(d.uuid)) for d in self.devices]
        handles: list[tuple[str, Any]] = []
        for index in range(int(nv.nvmlDeviceGetCount())):
            handle = nv.nvmlDeviceGetHandleByIndex(index)
            uuid = _text(_optional(nv, nv.nvmlDeviceGetUUID, handle) or "")
            handles.append((uuid if uuid and uuid not in dict(handles) else str(index), handle))
        return handles

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample_once()

    # sampling

    def sample_once(self) -> float | None:
        """Take one sample now; returns its MiB, or None if it could not be taken."""
        nv = self._nv
        if nv is None:
            return None
        try:
            pids = set(self._pids())
            self._foreign, self._throttled = set(), set()
            if pids:
                value, method, by_device = self._measure(nv, pids)
            else:
                value, method, by_device = 0.0, None, {key: 0.0 for key, _ in self._handles}
        except Exception as exc:  # a vanished server, a failing callback or NVML: skip this sample
            with self._lock:
                self.errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            return None
        self._record(value, method, by_device)
        with self._lock:
            self.foreign_pids |= self._foreign
            self.throttle_reasons |= self._throttled
            self.contended_samples += bool(self._foreign)
            self.throttled_samples += bool(self._throttled)
        return value

    def contention(self) -> tuple[int, int, int]:
        """(samples, samples with another process on a device, throttled samples) so far."""
        with self._lock:
            return self.samples, self.contended_samples, self.throttled_samples

    def _measure(self, nv: ModuleType, pids: set[int]) -> tuple[float, str | None, dict[str, float]]:
        """(MiB over all devices, method, MiB per device)."""
        per_process: dict[str, float] = {}
        matched = False
        device_used: dict[str, float] = {}
        for key, handle in self._handles:
            per_process[key] = 0.0
            for proc in self._processes(nv, handle):
                used = getattr(proc, "usedGpuMemory", None)
                if int(proc.pid) in pids and used is not None:
                    per_process[key] += int(used) / MIB
                    matched = True
                elif int(proc.pid) not in pids and int(proc.pid) != os.getpid():  # not the server, not a ballast
                    self._foreign.add(int(proc.pid))
            self._throttled |= _throttle_reasons(nv, handle)
            device_used[key] = self._device_used(nv, handle) / MIB
        if matched:
            return sum(per_process.values()), METHOD_PER_PROCESS, per_process
        delta = sum(device_used.values()) - (self.baseline_mib or 0.0)
        deltas = {key: max(0.0, used - self.baseline_by_device.get(key, 0.0)) for key, used in device_used.items()}
        if delta > 0:
            return delta, METHOD_DEVICE_DELTA, deltas
        return 0.0, None, {key: 0.0 for key in device_used}

    @staticmethod
    def _processes(nv: ModuleType, handle: Any) -> list[Any]:
        try:
            return list(nv.nvmlDeviceGetComputeRunningProcesses(handle))
        except Exception as exc:
            if getattr(exc, "value", None) != _NVML_ERROR_FUNCTION_NOT_FOUND or not _is_nvml_error(nv, exc):
                raise
            return list(nv.nvmlDeviceGetComputeRunningProcesses_v2(handle))  # drivers older than 510

    @staticmethod
    def _device_used(nv: ModuleType, handle: Any) -> int:
        return int(nv.nvmlDeviceGetMemoryInfo(handle).used)

    def _record(self, value: float, method: str | None, by_device: dict[str, float]) -> None:
        with self._lock:
            self.samples += 1
            self.current_mib = value
            self.current_by_device = by_device
            for key, mib in by_device.items():
                if key not in self.peak_by_device or mib > self.peak_by_device[key]:
                    self.peak_by_device[key] = mib
            if method is not None:
                self.method = method
            if self.peak_mib is None or value > self.peak_mib:
                self.peak_mib = value
                self.peak_method = method

    def reset_peak(self) -> None:
        """Restart peak tracking from the latest sample (e.g. after warm-up)."""
        with self._lock:
            self.peak_mib = self.current_mib
            self.peak_method = self.method if self.current_mib else None
            self.peak_by_device = dict(self.current_by_device)

    def as_dict(self) -> dict[str, object]:
        with self._lock:
            return {
                "available": self.available,
                "reason": self.reason,
                "interval_s": self.interval,
                "samples": self.samples,
                "current_mib": self.current_mib,
                "peak_mib": self.peak_mib,
                "peak_by_device": dict(self.peak_by_device),
                "method": self.method,
                "peak_method": self.peak_method,
                "baseline_mib": self.baseline_mib,
                "foreign_pids": sorted(self.foreign_pids),
                "throttle_reasons": sorted(self.throttle_reasons),
                "errors": self.errors,
                "last_error": self.last_error,
            }


def _throttle_reasons(nv: ModuleType, handle: Any) -> set[str]:
    """The slowing clock-event reasons NVML reports now (empty where the driver has no such call)."""
    call = getattr(nv, "nvmlDeviceGetCurrentClocksEventReasons", None) or getattr(
        nv, "nvmlDeviceGetCurrentClocksThrottleReasons", None
    )
    if call is None:
        return set()
    try:
        mask = int(call(handle))
    except Exception:  # not supported on this device or driver
        return set()
    return {name for bit, name in THROTTLE_REASONS.items() if mask & bit}
