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
from pytest_llamabench.hardware import gpu, vram
from pytest_llamabench.hardware.ballast import GIB, MIB, VramBallast, fill, format_uuid
from pytest_llamabench.errors import ConfigError, GpuUnavailable
from pytest_llamabench.hardware.gpu import GpuStatus, probe_gpu, require_gpu, snapshot_gpus
from pytest_llamabench.hardware.vram import VramSampler
from pytest_llamabench.hardware.device import Device, select_visible, visible_devices_env
from pytest_llamabench.hardware.gpu import discover_devices

ROOT = Path(__file__).resolve().parents[1]
REAL_GPU = probe_gpu()
needs_gpu = pytest.mark.skipif(not REAL_GPU.available, reason=f"needs an NVIDIA GPU: {REAL_GPU.reason}")


# -- a fake pynvml ----------------------------------------------------------------------


class FakeNVMLError(Exception):
    _names = {
        3: "Not Supported",
        6: "Not Found",
        9: "Driver Not Loaded",
        12: "NVML Shared Library Not Found",
        15: "GPU is lost",
    }

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

    def nvmlDeviceGetHandleByUUID(self, uuid: str | bytes) -> FakeDevice:
        self._check()
        text = uuid.decode() if isinstance(uuid, bytes) else uuid
        for device in self.devices:
            if device.uuid == text:
                return device
        raise FakeNVMLError(6)

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


def test_sampler_sees_other_processes_and_throttled_clocks(install: Any) -> None:
    dev = FakeDevice(processes=[(100, 3 * GIB)])
    fake = install(FakeNvml([dev]))
    sampler = _opened(fake, {100})
    sampler.sample_once()
    assert sampler.contention() == (1, 0, 0) and not sampler.foreign_pids
    dev.processes.append((555, GIB))  # someone else's job lands on the GPU
    fake.nvmlDeviceGetCurrentClocksEventReasons = lambda handle: 0x1 | 0x40  # idle + hw thermal
    sampler.sample_once()
    assert sampler.contention() == (2, 1, 1)
    info = sampler.as_dict()
    assert info["foreign_pids"] == [555] and info["throttle_reasons"] == ["hw-thermal"]
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
        "devices": [
            {
                "cuda_ordinal": 0,
                "name": "Fake H100",
                "uuid": "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f",
                "total_bytes": 80 * GIB,
                "free_before": 70 * GIB + 123 * MIB,
                "held_bytes": 62 * GIB + 122 * MIB,
                "free_after": 8 * GIB + 1 * MIB,
                "chunks": 63,
            }
        ],
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


# -- devices: discovery and CUDA_VISIBLE_DEVICES -------------------------------------------------

UUID_A = "GPU-aaaaaaaa-1111-2222-3333-444444444444"
UUID_B = "GPU-bbbbbbbb-1111-2222-3333-444444444444"
UUID_B2 = "GPU-bbbbcccc-1111-2222-3333-444444444444"


def _three_gpus() -> list[FakeDevice]:
    return [FakeDevice(uuid=UUID_A), FakeDevice(name="NVIDIA L4", uuid=UUID_B), FakeDevice(uuid=UUID_B2)]


def test_discover_all_devices_without_the_variable(install: Any) -> None:
    fake = install(FakeNvml(_three_gpus()))
    assert discover_devices({}) == [
        Device(0, UUID_A, "NVIDIA H100 80GB HBM3"),
        Device(1, UUID_B, "NVIDIA L4"),
        Device(2, UUID_B2, "NVIDIA H100 80GB HBM3"),
    ]
    assert fake.refs == 0


@pytest.mark.parametrize(
    ("value", "indices"),
    [
        ("1", [1]),
        ("2,0", [2, 0]),  # CUDA's order, not NVML's
        (" 0 , 2 ", [0, 2]),
        (UUID_B, [1]),
        (UUID_B.upper().replace("GPU-", "gpu-"), [1]),
        ("GPU-aaaa", [0]),  # a unique prefix
        ("GPU-bbbbc,0", [2, 0]),
    ],
)
def test_discover_follows_cuda_visible_devices(install: Any, value: str, indices: list[int]) -> None:
    install(FakeNvml(_three_gpus()))
    assert [d.index for d in discover_devices({"CUDA_VISIBLE_DEVICES": value})] == indices


@pytest.mark.parametrize("value", ["", "-1", " -1 "])
def test_discover_none_visible_needs_no_nvml(install: Any, value: str) -> None:
    install(FakeNvml([], init_error=12))
    assert discover_devices({"CUDA_VISIBLE_DEVICES": value}) == []


@pytest.mark.parametrize(
    ("value", "entry", "problem"),
    [
        ("0,7", "'7'", "matches no GPU"),
        ("GPU-ffff", "'GPU-ffff'", "matches no GPU"),
        ("MIG-aaaa-1", "'MIG-aaaa-1'", "matches no GPU"),
        ("0,-1", "'-1'", "matches no GPU"),
        ("0,,1", "''", "matches no GPU"),
        ("GPU-bbbb", "'GPU-bbbb'", "matches several GPUs"),
    ],
)
def test_discover_bad_entry_names_variable_entry_and_gpus(
    install: Any, value: str, entry: str, problem: str
) -> None:
    install(FakeNvml(_three_gpus()))
    with pytest.raises(ConfigError) as info:
        discover_devices({"CUDA_VISIBLE_DEVICES": value})
    message = str(info.value)
    assert message.startswith(f"CUDA_VISIBLE_DEVICES={value!r}: entry {entry} {problem}")
    assert f"0: NVIDIA H100 80GB HBM3 ({UUID_A}); 1: NVIDIA L4 ({UUID_B})" in message


def test_discover_rejects_a_gpu_listed_twice(install: Any) -> None:
    install(FakeNvml(_three_gpus()))
    with pytest.raises(ConfigError, match=f"entry '{UUID_A}' names {UUID_A} a second time"):
        discover_devices({"CUDA_VISIBLE_DEVICES": f"0,{UUID_A}"})


def test_discover_without_nvml_says_why(install: Any) -> None:
    install(FakeNvml([], init_error=12))
    with pytest.raises(GpuUnavailable, match="NVML library not found"):
        discover_devices({"CUDA_VISIBLE_DEVICES": "0"})


def test_discover_reads_os_environ_by_default(install: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    install(FakeNvml(_three_gpus()))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert [d.uuid for d in discover_devices()] == [UUID_B]
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert len(discover_devices()) == 3


def test_select_visible_without_nvml() -> None:
    present = [Device(0, UUID_A), Device(1, UUID_B)]
    assert select_visible(present, "1,0") == [Device(1, UUID_B), Device(0, UUID_A)]
    with pytest.raises(ConfigError, match=r"GPUs present .*: none"):
        select_visible([], "0")


def test_visible_devices_env() -> None:
    assert visible_devices_env([Device(1, UUID_B), Device(0, UUID_A)]) == {
        "CUDA_VISIBLE_DEVICES": f"{UUID_B},{UUID_A}",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
    }
    assert visible_devices_env([])["CUDA_VISIBLE_DEVICES"] == ""


# -- devices: the sampler on chosen devices ----------------------------------------------------------


def test_sampler_reads_only_the_chosen_device(install: Any) -> None:
    a = FakeDevice(uuid=UUID_A, processes=[(100, 3 * GIB)])
    b = FakeDevice(uuid=UUID_B, used=2 * GIB, processes=[(100, 1 * GIB), (101, 512 * MIB)])
    fake = install(FakeNvml([a, b]))
    sampler = VramSampler(lambda: {100, 101}, devices=[Device(1, UUID_B)])
    assert sampler._open()
    assert sampler.reason == "sampling 1 device(s)" and sampler.baseline_mib == 2048.0
    assert sampler.sample_once() == 1536.0  # device a is not counted
    assert sampler.peak_by_device == {UUID_B: 1536.0}
    b.processes = [(100, 256 * MIB)]
    assert sampler.sample_once() == 256.0
    assert sampler.current_by_device == {UUID_B: 256.0}
    assert sampler.peak_by_device == {UUID_B: 1536.0}
    assert sampler.as_dict()["peak_by_device"] == {UUID_B: 1536.0}
    sampler.stop()
    assert fake.refs == 0


def test_sampler_peaks_per_device(install: Any) -> None:
    a = FakeDevice(uuid=UUID_A, processes=[(100, 4 * GIB)])
    b = FakeDevice(uuid=UUID_B, processes=[(100, 1 * GIB)])
    sampler = _opened(install(FakeNvml([a, b])), {100})
    assert sampler.sample_once() == 5120.0
    a.processes, b.processes = [(100, 1 * GIB)], [(100, 2 * GIB)]
    assert sampler.sample_once() == 3072.0
    assert sampler.peak_mib == 5120.0  # the sum's peak ...
    assert sampler.peak_by_device == {UUID_A: 4096.0, UUID_B: 2048.0}  # ... each device's own
    sampler.reset_peak()
    assert sampler.peak_by_device == {UUID_A: 1024.0, UUID_B: 2048.0}
    sampler.stop()


def test_sampler_device_delta_per_device(install: Any) -> None:
    a = FakeDevice(uuid=UUID_A, used=1 * GIB)
    b = FakeDevice(uuid=UUID_B, used=2 * GIB)
    sampler = _opened(install(FakeNvml([a, b])), {100})  # PID 100 not in NVML's lists
    assert sampler.baseline_by_device == {UUID_A: 1024.0, UUID_B: 2048.0}
    b.used = 5 * GIB
    assert sampler.sample_once() == 3072.0 and sampler.method == "device-delta"
    assert sampler.peak_by_device == {UUID_A: 0.0, UUID_B: 3072.0}
    sampler.stop()


def test_sampler_unknown_device_is_unavailable(install: Any) -> None:
    fake = install(FakeNvml([FakeDevice(uuid=UUID_A)]))
    with VramSampler(lambda: {1}, devices=[Device(3, UUID_B)]) as sampler:
        assert not sampler.available
        assert sampler.reason == f"NVML error: Not Found (looking up {UUID_B})"
    assert sampler.as_dict()["peak_by_device"] == {}
    assert fake.refs == 0
    with VramSampler(lambda: {1}, devices=[]) as sampler:
        assert not sampler.available and sampler.reason == "no device selected"


# -- devices: the ballast on chosen devices -----------------------------------------------------------


class FakeCuda:
    """Stands in for ballast.CudaDriver with several devices: CUdevice = ordinal, context = 0xC0 + ordinal."""

    def __init__(self, uuids: list[str], free: list[int], total: int = 80 * GIB) -> None:
        self.uuids, self.free, self.total = uuids, list(free), total
        self.pointers: dict[int, tuple[int, int]] = {}  # pointer -> (device, size)
        self.next_pointer = 0x7000_0000_0000
        self.retained = [0] * len(uuids)
        self.stack: list[int] = []
        self.fail_free_on: int | None = None  # a device whose cuMemFree fails

    def init(self) -> None:
        pass

    def device_count(self) -> int:
        return len(self.uuids)

    def device(self, ordinal: int) -> int:
        if not 0 <= ordinal < len(self.uuids):
            raise GpuUnavailable(f"CUDA driver call cuDeviceGet({ordinal}) failed: CUDA_ERROR_INVALID_DEVICE (101)")
        return ordinal

    def device_name(self, device: int) -> str:
        return f"Fake GPU {device}"

    def device_uuid(self, device: int) -> str:
        return self.uuids[device]

    def retain_primary_context(self, device: int) -> int:
        self.retained[device] += 1
        return 0xC0 + device

    def release_primary_context(self, device: int) -> None:
        self.retained[device] -= 1

    def push_context(self, context: int) -> None:
        self.stack.append(context)

    def pop_context(self) -> None:
        self.stack.pop()

    def _current(self) -> int:
        assert len(self.stack) == 1, self.stack
        return self.stack[0] - 0xC0

    def mem_get_info(self) -> tuple[int, int]:
        return self.free[self._current()], self.total

    def mem_alloc(self, size: int) -> int | None:
        device = self._current()
        if size > self.free[device]:
            return None
        self.next_pointer += size
        self.pointers[self.next_pointer] = (device, size)
        self.free[device] -= size
        return self.next_pointer

    def mem_free(self, pointer: int) -> None:
        device, size = self.pointers[pointer]
        assert device == self._current(), "freed in another device's context"
        if device == self.fail_free_on:
            raise GpuUnavailable("CUDA driver call cuMemFree_v2 failed: CUDA_ERROR_ILLEGAL_ADDRESS (700)")
        del self.pointers[pointer]
        self.free[device] += size


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda([UUID_A, UUID_B, UUID_B2], free=[70 * GIB, 40 * GIB, 60 * GIB])
    monkeypatch.setattr(ballast_module, "CudaDriver", lambda: fake)
    return fake


def test_ballast_holds_the_budget_on_every_device(cuda: FakeCuda) -> None:
    devices = [Device(1, UUID_B.upper()), Device(0, UUID_A)]  # matched by UUID, any case, this order
    with VramBallast(8 * GIB, devices=devices) as ballast:
        assert cuda.free == [8 * GIB, 8 * GIB, 60 * GIB]  # device 2 untouched
        assert cuda.retained == [1, 1, 0] and cuda.stack == []
        assert [(h.ordinal, h.uuid) for h in ballast.holds] == [(1, UUID_B), (0, UUID_A)]
        assert ballast.device_index == 1 and ballast.device_uuid == UUID_B  # the first one
        assert ballast.held_bytes == 94 * GIB and ballast.free_after == 16 * GIB  # totals
    assert cuda.pointers == {} and cuda.free == [70 * GIB, 40 * GIB, 60 * GIB]
    assert cuda.retained == [0, 0, 0]
    held: Any = ballast.as_dict()["devices"]
    assert [(d["cuda_ordinal"], d["held_bytes"], d["free_after"]) for d in held] == [
        (1, 32 * GIB, 8 * GIB),
        (0, 62 * GIB, 8 * GIB),
    ]


def test_ballast_device_not_visible_holds_nothing(cuda: FakeCuda) -> None:
    missing = Device(5, "GPU-ffffffff-0000-0000-0000-000000000000")
    ballast = VramBallast(8 * GIB, devices=[Device(0, UUID_A), missing])
    with pytest.raises(GpuUnavailable, match=r"no CUDA device .* has UUID GPU-ffffffff.*CUDA_VISIBLE_DEVICES"):
        ballast.acquire()
    assert not ballast.is_held and cuda.retained == [0, 0, 0] and cuda.pointers == {}


def test_ballast_failing_on_the_second_device_releases_the_first(cuda: FakeCuda) -> None:
    ballast = VramBallast(50 * GIB, devices=[Device(0, UUID_A), Device(1, UUID_B)])  # only 40 GiB free on B
    with pytest.raises(GpuUnavailable, match=r"50.00 GiB is more than the 40.00 GiB free on CUDA device 1 \(Fake"):
        ballast.acquire()
    assert not ballast.is_held
    assert cuda.retained == [0, 0, 0] and cuda.pointers == {} and cuda.free[0] == 70 * GIB


def test_ballast_release_failure_still_releases_every_device(cuda: FakeCuda) -> None:
    cuda.fail_free_on = 0
    ballast = VramBallast(8 * GIB, devices=[Device(0, UUID_A), Device(1, UUID_B)])
    with pytest.raises(GpuUnavailable, match="releasing the VRAM ballast failed: .*cuMemFree_v2"):
        with ballast:
            pass
    assert not ballast.is_held
    assert cuda.retained == [0, 0, 0]  # every context released
    assert all(device == 0 for device, _ in cuda.pointers.values())  # device 1 freed in full
    assert cuda.free[1] == 40 * GIB


def test_ballast_rejects_empty_or_repeated_devices() -> None:
    with pytest.raises(ConfigError, match="no device given"):
        VramBallast(GIB, devices=[])
    with pytest.raises(ConfigError, match="may be given once"):
        VramBallast(GIB, devices=[Device(0, UUID_A), Device(0, UUID_A.upper())])


# -- devices: servers ------------------------------------------------------------------------------


def _gpu_config(**changes: Any) -> Any:
    from pytest_llamabench.config import ModelSpec, ServerConfig

    model = ModelSpec("m", Path("/models/m.gguf"))
    return ServerConfig(**{"name": "g", "model": model, "server": {}, "gpu": True, **changes})


def test_server_environment_shows_exactly_the_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_llamabench.server.launcher import server_environment

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    devices = [Device(1, UUID_B), Device(0, UUID_A)]
    env = server_environment({"OTHER": "1"}, None, devices)
    assert env["CUDA_VISIBLE_DEVICES"] == f"{UUID_B},{UUID_A}"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and env["OTHER"] == "1"
    assert server_environment({}, None)["CUDA_VISIBLE_DEVICES"] == "0"  # None: inherited
    own = server_environment({"CUDA_VISIBLE_DEVICES": "1"}, None, devices)  # the config's env wins
    assert own["CUDA_VISIBLE_DEVICES"] == "1" and "CUDA_DEVICE_ORDER" not in own


def test_local_server_uses_and_reports_devices(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from pytest_llamabench.server import launcher

    seen: dict[str, Any] = {}

    class FakePopen:
        pid = 4242

        def __init__(self, argv: list[str], **kwargs: Any) -> None:
            seen.update(kwargs)

        def poll(self) -> int:
            return 0

    monkeypatch.setattr(launcher.subprocess, "Popen", FakePopen)
    server = launcher.LocalServer(
        _gpu_config(), binary=Path("/bin/llama-server"), log_dir=tmp_path, devices=(Device(1, UUID_B),)
    )
    server._launch(Path("/models/m.gguf"))
    assert seen["env"]["CUDA_VISIBLE_DEVICES"] == UUID_B
    assert server.describe()["devices"] == [UUID_B]
    plain = launcher.LocalServer(_gpu_config(), binary=Path("/bin/llama-server"), log_dir=tmp_path)
    assert "devices" not in plain.describe()


def test_container_requests_the_devices(tmp_path: Path) -> None:
    docker = pytest.importorskip("docker")
    from pytest_llamabench.server.container import ContainerServer

    def create_args(devices: Any, **changes: Any) -> dict[str, Any]:
        config = _gpu_config(image="llama:test", **changes)
        server = ContainerServer(config, run_id="r1", log_dir=tmp_path, client=object(), devices=devices)
        server.container_name = "c1"
        kwargs: dict[str, Any] = server._create_args(Path("/models/m.gguf"))
        if devices:
            assert server.describe()["devices"] == [d.uuid for d in devices]
        return kwargs

    requests = create_args([Device(1, UUID_B), Device(0, UUID_A)])["device_requests"]
    assert requests == [docker.types.DeviceRequest(device_ids=[UUID_B, UUID_A], capabilities=[["gpu"]])]
    assert requests[0]["Count"] == 0  # not count=-1: only those
    assert create_args(None)["device_requests"] == [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
    assert create_args([])["device_requests"] == []
    assert "device_requests" not in create_args([Device(0, UUID_A)], gpu=False)


def test_bench_passes_devices_to_servers_ballast_and_sampler(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from pytest_llamabench.bench import Bench, BenchSettings

    devices = (Device(1, UUID_B),)
    bench = Bench(BenchSettings(log_dir=tmp_path, server_bin_candidates=[], devices=devices), log=lambda _: None)
    bench._binary = (Path("/bin/llama-server"), "test", "version: 1")
    assert bench.make_server(_gpu_config()).devices == devices
    assert bench.make_server(_gpu_config(image="llama:test")).devices == devices
    assert bench.make_server(_gpu_config(gpu=False)).devices is None  # CPU configs: as before

    made: dict[str, Any] = {}

    class Recorder:
        def __init__(self, *args: Any, devices: Any = None) -> None:
            made.setdefault("devices", []).append(devices)

        def __enter__(self) -> Recorder:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

    class NoServer:
        pids = staticmethod(lambda: set())

        def start(self) -> None:
            pass

        def stop(self) -> None:
            pass

    monkeypatch.setattr(ballast_module, "VramBallast", Recorder)
    monkeypatch.setattr(vram, "VramSampler", Recorder)
    monkeypatch.setattr(bench, "make_server", lambda config: NoServer())
    with bench.launch(_gpu_config(vram_budget=GIB)):
        pass
    assert made["devices"] == [devices, devices]  # ballast, then sampler

    bench.settings.devices = ()
    with pytest.raises(GpuUnavailable, match="no GPU is selected"):
        with bench.launch(_gpu_config()):
            pass


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
