"""NVML probe, snapshots, the VRAM sampler and the VRAM ballast.

Most tests swap ``pynvml`` (or the CUDA driver binding) for a fake; the ``gpu``-marked
ones need a real NVIDIA GPU and skip when ``probe_gpu()`` finds none.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest

from pytest_llamabench.hardware import ballast as ballast_module
from pytest_llamabench.hardware import gpu
from pytest_llamabench.hardware.ballast import GIB, MIB, VramBallast, fill, format_uuid
from pytest_llamabench.errors import ConfigError, GpuUnavailable
from pytest_llamabench.hardware.gpu import GpuStatus, VramSampler, probe_gpu, require_gpu, snapshot_gpus

ROOT = Path(__file__).resolve().parents[1]
REAL_GPU = probe_gpu()
needs_gpu = pytest.mark.skipif(not REAL_GPU.available, reason=f"needs an NVIDIA GPU: {REAL_GPU.reason}")


# -- a fake pynvml ----------------------------------------------------------------------


class FakeNVMLError(Exception):
    _names = {3: "Not Supported", 9: "Driver Not Loaded", 12: "NVML Shared Library Not Found", 15: "GPU is lost"}

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return self._names.get(self.value, f"NVML Error with code {self.value}")


@dataclass
class FakeDevice:
    name: str = "NVIDIA H100 80GB HBM3"
    uuid: str = "GPU-00000000-1111-2222-3333-444444444444"
    total: int = 80 * GIB
    used: int = 1 * GIB
    processes: list[tuple[int, int | None]] = field(default_factory=list)  # (pid, usedGpuMemory)
    power_supported: bool = True


class FakeNvml:
    """Stands in for the ``pynvml`` module: the calls gpu.py makes, with counters."""

    NVML_CLOCK_SM = 1
    NVML_CLOCK_MEM = 2
    NVML_TEMPERATURE_GPU = 0
    NVMLError = FakeNVMLError

    def __init__(self, devices: list[FakeDevice], *, init_error: int | None = None) -> None:
        self.devices = devices
        self.init_error = init_error
        self.process_error: int | None = None
        self.refs = 0
        self.inits = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise FakeNVMLError(self.init_error)
        self.refs += 1
        self.inits += 1

    def nvmlShutdown(self) -> None:
        if self.refs == 0:
            raise FakeNVMLError(1)  # Uninitialized
        self.refs -= 1

    def _check(self) -> None:
        assert self.refs > 0, "NVML used without nvmlInit"

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeDevice:
        self._check()
        return self.devices[index]

    def nvmlSystemGetDriverVersion(self) -> str:
        return "580.95.05"

    def nvmlSystemGetCudaDriverVersion_v2(self) -> int:
        return 13000

    def nvmlDeviceGetName(self, handle: FakeDevice) -> bytes:
        return handle.name.encode()  # old pynvml versions return bytes

    def nvmlDeviceGetUUID(self, handle: FakeDevice) -> str:
        return handle.uuid

    def nvmlDeviceGetMemoryInfo(self, handle: FakeDevice) -> SimpleNamespace:
        self._check()
        return SimpleNamespace(total=handle.total, used=handle.used, free=handle.total - handle.used)

    def nvmlDeviceGetClockInfo(self, handle: FakeDevice, kind: int) -> int:
        return {1: 1980, 2: 2619}[kind]

    def nvmlDeviceGetTemperature(self, handle: FakeDevice, sensor: int) -> int:
        return 41

    def nvmlDeviceGetPowerUsage(self, handle: FakeDevice) -> int:
        if not handle.power_supported:
            raise FakeNVMLError(3)
        return 71_500

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeDevice) -> list[SimpleNamespace]:
        self._check()
        if self.process_error is not None:
            raise FakeNVMLError(self.process_error)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle.processes]


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch) -> Any:
    def _install(fake: object) -> Any:
        monkeypatch.setitem(sys.modules, "pynvml", fake)
        return fake

    return _install


# -- probe ------------------------------------------------------------------------------


def test_probe_on_this_machine_says_why_not() -> None:
    if REAL_GPU.available:
        pytest.skip("this machine has a GPU")
    assert REAL_GPU.device_count == 0
    assert "library" in REAL_GPU.reason.lower() or "driver" in REAL_GPU.reason.lower()
    assert REAL_GPU.fix


@pytest.mark.parametrize(
    ("code", "reason"),
    [
        (12, "NVML library not found (no NVIDIA driver installed)"),
        (9, "driver not loaded"),
        (999, "NVML error: NVML Error with code 999"),
    ],
)
def test_probe_reports_init_errors(install: Any, code: int, reason: str) -> None:
    install(FakeNvml([], init_error=code))
    assert probe_gpu() == GpuStatus(False, reason)


def test_probe_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    status = probe_gpu()
    assert not status.available
    assert "nvidia-ml-py" in status.reason


def test_probe_no_device(install: Any) -> None:
    fake = install(FakeNvml([]))
    assert probe_gpu() == GpuStatus(False, "no NVIDIA device")
    assert fake.refs == 0


def test_probe_available_and_repeatable(install: Any) -> None:
    fake = install(FakeNvml([FakeDevice(), FakeDevice()]))
    for _ in range(3):
        assert probe_gpu() == GpuStatus(True, "2 NVIDIA devices", 2)
    assert fake.inits == 3 and fake.refs == 0  # every init paired with a shutdown


def test_require_gpu_raises_with_fix(install: Any) -> None:
    install(FakeNvml([], init_error=12))
    with pytest.raises(GpuUnavailable) as info:
        require_gpu()
    assert "NVML library not found" in str(info.value)
    assert "install the NVIDIA driver" in str(info.value)
    assert require_gpu(GpuStatus(True, "1 NVIDIA device", 1)).available


# -- snapshot ---------------------------------------------------------------------------


def test_snapshot_reads_every_device(install: Any) -> None:
    fake = install(FakeNvml([FakeDevice(), FakeDevice(name="NVIDIA L4", power_supported=False)]))
    first, second = snapshot_gpus()
    assert fake.refs == 0
    assert first.as_dict() == {
        "index": 0,
        "name": "NVIDIA H100 80GB HBM3",
        "uuid": "GPU-00000000-1111-2222-3333-444444444444",
        "driver": "580.95.05",
        "cuda": "13.0",
        "memory_total_mib": 81920.0,
        "memory_free_mib": 80896.0,
        "memory_used_mib": 1024.0,
        "sm_clock_mhz": 1980,
        "mem_clock_mhz": 2619,
        "temperature_c": 41,
        "power_w": 71.5,
    }
    assert (second.index, second.name, second.power_w) == (1, "NVIDIA L4", None)


def test_snapshot_without_nvml_is_empty(install: Any) -> None:
    install(FakeNvml([], init_error=12))
    assert snapshot_gpus() == []


def test_snapshot_lost_gpu_raises(install: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = install(FakeNvml([FakeDevice()]))

    def lost(handle: object) -> None:
        raise FakeNVMLError(15)

    monkeypatch.setattr(fake, "nvmlDeviceGetMemoryInfo", lost)
    with pytest.raises(GpuUnavailable, match="GPU is lost"):
        snapshot_gpus()
    assert fake.refs == 0


def test_cuda_version_format() -> None:
    assert gpu.format_cuda_version(12040) == "12.4"
    assert gpu.format_cuda_version(13000) == "13.0"


# -- sampler arithmetic (no thread: sample_once) ----------------------------------------------


def _opened(fake: FakeNvml, pids: set[int]) -> VramSampler:
    sampler = VramSampler(lambda: pids)
    assert sampler._open()
    return sampler


def test_sampler_sums_server_processes_over_devices(install: Any) -> None:
    a = FakeDevice(processes=[(100, 3 * GIB), (999, 5 * GIB)])
    b = FakeDevice(processes=[(100, 1 * GIB), (101, 512 * MIB)])
    sampler = _opened(install(FakeNvml([a, b])), {100, 101})
    assert sampler.sample_once() == 4.5 * 1024
    assert sampler.method == "per-process"
    assert sampler.peak_mib == 4.5 * 1024
    sampler.stop()


def test_sampler_ignores_vanished_pids_and_unknown_memory(install: Any) -> None:
    dev = FakeDevice(processes=[(100, 2 * GIB), (101, None)])
    sampler = _opened(install(FakeNvml([dev])), {100, 101, 102})  # 102 has exited
    assert sampler.sample_once() == 2048.0
    assert sampler.method == "per-process"
    dev.processes = []  # server gone from NVML's list, device memory back at baseline
    assert sampler.sample_once() == 0.0
    assert (sampler.current_mib, sampler.peak_mib, sampler.samples) == (0.0, 2048.0, 2)
    sampler.stop()


def test_sampler_falls_back_to_device_delta(install: Any) -> None:
    dev = FakeDevice(used=2 * GIB, processes=[(7, 4 * GIB)])  # PID of another namespace
    sampler = _opened(install(FakeNvml([dev])), {100})
    assert sampler.baseline_mib == 2048.0
    assert sampler.sample_once() == 0.0 and sampler.method is None  # nothing allocated yet
    dev.used = 5 * GIB
    assert sampler.sample_once() == 3072.0
    assert sampler.method == "device-delta" and sampler.peak_method == "device-delta"
    sampler.stop()


def test_sampler_uses_device_delta_when_usage_is_none(install: Any) -> None:
    dev = FakeDevice(used=1 * GIB, processes=[(100, None)])
    sampler = _opened(install(FakeNvml([dev])), {100})
    dev.used = 2 * GIB
    assert sampler.sample_once() == 1024.0
    assert sampler.method == "device-delta"
    sampler.stop()


def test_sampler_counts_nothing_without_pids(install: Any) -> None:
    dev = FakeDevice(used=1 * GIB)
    sampler = _opened(install(FakeNvml([dev])), set())
    dev.used = 9 * GIB  # someone else: not counted while the server has no PIDs
    assert sampler.sample_once() == 0.0
    sampler.stop()


def test_sampler_peak_and_reset(install: Any) -> None:
    dev = FakeDevice(processes=[(100, 6 * GIB)])
    sampler = _opened(install(FakeNvml([dev])), {100})
    sampler.sample_once()
    dev.processes = [(100, 2 * GIB)]
    sampler.sample_once()
    assert (sampler.current_mib, sampler.peak_mib) == (2048.0, 6144.0)
    sampler.reset_peak()
    assert sampler.peak_mib == 2048.0
    dev.processes = [(100, 3 * GIB)]
    sampler.sample_once()
    assert sampler.peak_mib == 3072.0
    sampler.stop()


def test_sampler_tolerates_errors(install: Any) -> None:
    fake = install(FakeNvml([FakeDevice(processes=[(100, GIB)])]))
    started = [False]

    def pids() -> set[int]:
        if not started[0]:
            started[0] = True
            raise RuntimeError("server not started")
        return {100}

    sampler = VramSampler(pids)
    assert sampler._open()
    assert sampler.sample_once() is None
    assert sampler.errors == 1 and "server not started" in sampler.last_error
    assert sampler.sample_once() == 1024.0
    fake.process_error = 15
    sampler._pids = lambda: {100}
    assert sampler.sample_once() is None and sampler.errors == 2
    assert sampler.as_dict()["peak_mib"] == 1024.0
    sampler.stop()


def test_sampler_unavailable_has_no_peak(install: Any) -> None:
    install(FakeNvml([], init_error=12))
    with VramSampler(lambda: {1}) as sampler:
        assert sampler.sample_once() is None
    assert not sampler.available
    assert sampler.peak_mib is None and sampler.current_mib is None
    assert sampler.reason.startswith("NVML library not found")


def test_sampler_thread_samples_and_stops(install: Any) -> None:
    dev = FakeDevice(processes=[(100, GIB)])
    fake = install(FakeNvml([dev]))
    with VramSampler(lambda: {100}, interval=0.01) as sampler:
        assert sampler.samples >= 1  # the first sample is taken by start()
        dev.processes = [(100, 3 * GIB)]
        deadline = time.monotonic() + 5
        while sampler.peak_mib != 3072.0 and time.monotonic() < deadline:
            time.sleep(0.01)
        thread = sampler._thread
        assert thread is not None and thread.daemon
    assert sampler.peak_mib == 3072.0
    assert not thread.is_alive()
    assert fake.refs == 0
    sampler.stop()  # twice is fine
    with sampler:  # and it can run again
        pass


def test_sampler_rejects_bad_interval() -> None:
    with pytest.raises(ValueError):
        VramSampler(lambda: set(), interval=0)


# -- ballast with a fake driver ---------------------------------------------------------


def test_fill_uses_big_chunks_then_the_rest() -> None:
    sizes: list[int] = []

    def alloc(size: int) -> int:
        sizes.append(size)
        return len(sizes)

    held: list[tuple[int, int]] = []
    assert fill(alloc, 2 * GIB + 300 * MIB + 1, held) == 2 * GIB + 300 * MIB
    assert sizes == [GIB, GIB, 300 * MIB]
    assert [p for p, _ in held] == [1, 2, 3]


def test_fill_halves_on_out_of_memory() -> None:
    free = [GIB + 100 * MIB]

    def alloc(size: int) -> int | None:
        if size > free[0] - 50 * MIB:  # fragmentation: a bit less than "free" is allocatable
            return None
        free[0] -= size
        return size

    held: list[tuple[int, int]] = []
    got = fill(alloc, GIB + 100 * MIB, held)
    assert GIB <= got <= GIB + 50 * MIB
    assert sum(size for _, size in held) == got
    assert all(size % (2 * MIB) == 0 for _, size in held)


class FakeDriver:
    """Stands in for ballast.CudaDriver: one device with ``free``/``total`` bytes."""

    def __init__(self, free: int, total: int = 80 * GIB) -> None:
        self.free, self.total = free, total
        self.pointers: dict[int, int] = {}
        self.next_pointer = 0x7000_0000_0000
        self.retained = 0
        self.stack: list[int] = []
        self.fail_alloc_after: int | None = None

    def init(self) -> None:
        pass

    def device(self, ordinal: int) -> int:
        return ordinal

    def device_name(self, device: int) -> str:
        return "Fake H100"

    def device_uuid(self, device: int) -> str:
        return format_uuid(bytes(range(16)))

    def retain_primary_context(self, device: int) -> int:
        self.retained += 1
        return 0xC0

    def release_primary_context(self, device: int) -> None:
        self.retained -= 1

    def push_context(self, context: int) -> None:
        self.stack.append(context)

    def pop_context(self) -> None:
        self.stack.pop()

    def mem_get_info(self) -> tuple[int, int]:
        assert self.stack == [0xC0]
        return self.free, self.total

    def mem_alloc(self, size: int) -> int | None:
        assert self.stack == [0xC0]
        if self.fail_alloc_after is not None and len(self.pointers) >= self.fail_alloc_after:
            raise GpuUnavailable("CUDA driver call cuMemAlloc_v2 failed: CUDA_ERROR_ILLEGAL_ADDRESS (700)")
        if size > self.free:
            return None
        self.next_pointer += size
        self.pointers[self.next_pointer] = size
        self.free -= size
        return self.next_pointer

    def mem_free(self, pointer: int) -> None:
        self.free += self.pointers.pop(pointer)


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> FakeDriver:
    fake = FakeDriver(free=70 * GIB + 123 * MIB)
    monkeypatch.setattr(ballast_module, "CudaDriver", lambda: fake)
    return fake


def test_ballast_holds_all_but_the_budget(driver: FakeDriver) -> None:
    with VramBallast(8 * GIB) as ballast:
        assert ballast.is_held
        assert ballast.free_before == 70 * GIB + 123 * MIB
        assert ballast.held_bytes == 62 * GIB + 122 * MIB  # the odd MiB stays free (2 MiB granularity)
        assert ballast.free_after == 8 * GIB + 1 * MIB
        assert ballast.chunks == 63
        assert driver.retained == 1 and driver.stack == []
    assert not ballast.is_held
    assert driver.pointers == {} and driver.free == 70 * GIB + 123 * MIB
    assert driver.retained == 0
    assert ballast.as_dict() == {
        "budget_bytes": 8 * GIB,
        "device_index": 0,
        "device_name": "Fake H100",
        "device_uuid": "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f",
        "total_bytes": 80 * GIB,
        "free_before": 70 * GIB + 123 * MIB,
        "held_bytes": 62 * GIB + 122 * MIB,
        "free_after": 8 * GIB + 1 * MIB,
        "chunks": 63,
    }


def test_ballast_budget_above_free_holds_nothing(driver: FakeDriver) -> None:
    ballast = VramBallast(75 * GIB)
    with pytest.raises(GpuUnavailable, match=r"75.00 GiB is more than the 70.12 GiB free.*nothing was held"):
        ballast.acquire()
    assert not ballast.is_held and driver.retained == 0 and driver.pointers == {}
    assert ballast.held_bytes == 0


def test_ballast_failed_allocation_frees_what_it_held(driver: FakeDriver) -> None:
    driver.fail_alloc_after = 3
    with pytest.raises(GpuUnavailable, match="cuMemAlloc_v2 failed: CUDA_ERROR_ILLEGAL_ADDRESS"):
        VramBallast(8 * GIB).acquire()
    assert driver.pointers == {} and driver.retained == 0 and driver.stack == []


def test_ballast_rejects_negative_budget() -> None:
    with pytest.raises(ConfigError):
        VramBallast(-1)


def test_ballast_without_libcuda_says_so() -> None:
    if REAL_GPU.available:
        pytest.skip("this machine has a GPU")
    with pytest.raises(GpuUnavailable, match=r"(?i)libcuda\.so\.1.*install the NVIDIA driver"):
        VramBallast(8 * GIB).acquire()


# -- real GPU ---------------------------------------------------------------------------------


def _nvml_free_mib(uuid: str) -> float:
    (snap,) = [s for s in snapshot_gpus() if s.uuid == uuid]
    return snap.memory_free_mib


@pytest.mark.gpu
@needs_gpu
def test_real_snapshot() -> None:
    snaps = snapshot_gpus()
    assert len(snaps) == REAL_GPU.device_count
    for snap in snaps:
        assert snap.name and snap.uuid.startswith(("GPU-", "MIG-"))
        assert snap.memory_total_mib > 0
        assert snap.driver and snap.cuda


@pytest.mark.gpu
@needs_gpu
def test_real_ballast_limits_free_memory_and_gives_it_back() -> None:
    budget = 8 * GIB
    free_at_start = {s.uuid: s.memory_free_mib for s in snapshot_gpus()}
    ballast = VramBallast(budget)
    with ballast:
        assert abs(ballast.free_after - budget) < GIB, ballast.as_dict()
        assert ballast.held_bytes > 0
        assert abs(_nvml_free_mib(ballast.device_uuid) - budget / MIB) < 1024
        seen = _free_in_new_process(ballast.device_index)
        assert budget - 2 * GIB < seen <= ballast.free_after  # less the new process's own context
    start_mib = free_at_start[ballast.device_uuid]
    end_mib = _nvml_free_mib(ballast.device_uuid)
    assert abs(end_mib - start_mib) < 1024, (start_mib, end_mib, ballast.as_dict())


def _free_in_new_process(device_index: int) -> int:
    """cuMemGetInfo's free bytes as a freshly started process sees them."""
    code = (
        "from pytest_llamabench.hardware.ballast import CudaDriver\n"
        "d = CudaDriver(); d.init(); dev = d.device(%d); ctx = d.retain_primary_context(dev)\n"
        "d.push_context(ctx); print(d.mem_get_info()[0]); d.pop_context(); d.release_primary_context(dev)\n"
    ) % device_index
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    return int(out.stdout.strip())
