"""Make a GPU look smaller: hold all but a budget of its free memory while a server runs.

``VramBallast`` talks to the CUDA driver API (``libcuda.so.1``) through ctypes, so it
needs no torch and no CUDA toolkit, only the NVIDIA driver. It retains the device's
primary context in *this* process, reads free memory (``cuMemGetInfo_v2``) and allocates
``free - budget`` bytes with plain ``cuMemAlloc_v2`` calls (1 GiB chunks, smaller ones for
the rest; never managed memory). Processes started while it is held then see about
``budget_bytes`` free. Their own CUDA context (a few hundred MiB) comes out of that budget.

Which GPUs: given ``devices`` (``hardware.device.Device``), the budget is held on every one
of them (one primary context each), each found among this process's CUDA devices by UUID
(``cuDeviceGetUuid``), so no ordering question arises. Without ``devices``, on
``device_index``, a CUDA ordinal: it follows this process's ``CUDA_VISIBLE_DEVICES`` and
``CUDA_DEVICE_ORDER`` (default fastest-first, not NVML's PCI order). ``device_uuid`` is
recorded so it can be matched to ``GpuSnapshot.uuid``.

A budget larger than the free memory raises ``GpuUnavailable`` and holds nothing: a run
that cannot be limited as configured would report numbers for a bigger GPU.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import warnings
from collections.abc import Callable, Iterator, Sequence
from types import TracebackType
from typing import Any

from pytest_llamabench.errors import ConfigError, GpuUnavailable
from pytest_llamabench.hardware.device import Device

MIB = 1024 * 1024
GIB = 1024 * MIB

#: Allocation sizes: 1 GiB chunks, halved on out-of-memory, never below 2 MiB (the
#: large-page granularity of cuMemAlloc); a remainder under 2 MiB stays free.
CHUNK_BYTES = GIB
MIN_CHUNK_BYTES = 2 * MIB

LIBCUDA = "libcuda.so.1"

CUDA_SUCCESS = 0
CUDA_ERROR_OUT_OF_MEMORY = 2

_HINTS = {
    "CUDA_ERROR_NO_DEVICE": "no CUDA device is visible: check `nvidia-smi` and CUDA_VISIBLE_DEVICES",
    "CUDA_ERROR_INVALID_DEVICE": "the device index is out of range for the visible devices (CUDA_VISIBLE_DEVICES)",
    "CUDA_ERROR_INSUFFICIENT_DRIVER": "the NVIDIA driver is too old; update it",
    "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH": "the driver library and kernel module differ; reboot or reload the module",
    "CUDA_ERROR_DEVICE_UNAVAILABLE": "the device is busy or in exclusive-process mode (nvidia-smi -c)",
    "CUDA_ERROR_OUT_OF_MEMORY": "the GPU has no memory left; stop other processes using it (nvidia-smi)",
}

_c_int_p = ctypes.POINTER(ctypes.c_int)
_c_size_t_p = ctypes.POINTER(ctypes.c_size_t)

#: name -> argtypes; every function returns a CUresult (int).
_PROTOTYPES: dict[str, tuple[Any, ...]] = {
    "cuInit": (ctypes.c_uint,),
    "cuGetErrorName": (ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)),
    "cuDeviceGet": (_c_int_p, ctypes.c_int),
    "cuDeviceGetCount": (_c_int_p,),
    "cuDeviceGetName": (ctypes.c_char_p, ctypes.c_int, ctypes.c_int),
    "cuDevicePrimaryCtxRetain": (ctypes.POINTER(ctypes.c_void_p), ctypes.c_int),
    "cuDevicePrimaryCtxRelease_v2": (ctypes.c_int,),
    "cuCtxPushCurrent_v2": (ctypes.c_void_p,),
    "cuCtxPopCurrent_v2": (ctypes.POINTER(ctypes.c_void_p),),
    "cuMemGetInfo_v2": (_c_size_t_p, _c_size_t_p),
    "cuMemAlloc_v2": (ctypes.POINTER(ctypes.c_uint64), ctypes.c_size_t),
    "cuMemFree_v2": (ctypes.c_uint64,),
}
_OPTIONAL_PROTOTYPES: dict[str, tuple[Any, ...]] = {
    "cuDeviceGetUuid_v2": (ctypes.POINTER(ctypes.c_ubyte * 16), ctypes.c_int),
    "cuDeviceGetUuid": (ctypes.POINTER(ctypes.c_ubyte * 16), ctypes.c_int),  # drivers before CUDA 11.4
}


def load_libcuda() -> ctypes.CDLL:
    """``libcuda.so.1``, or ``GpuUnavailable`` saying how to get it."""
    try:
        return ctypes.CDLL(LIBCUDA)
    except OSError as exc:
        raise GpuUnavailable(
            f"VRAM budget: cannot load the CUDA driver library {LIBCUDA} ({exc}); no NVIDIA driver is "
            "installed or visible here. Install the NVIDIA driver (in a container: the NVIDIA container "
            "toolkit, --gpus all), or remove the VRAM budget from the config"
        ) from exc


class CudaDriver:
    """The few CUDA driver API calls the ballast needs. Every CUresult is checked and a failure
    raises ``GpuUnavailable`` naming the call and the error (``cuGetErrorName``)."""

    def __init__(self, lib: ctypes.CDLL | None = None) -> None:
        self._lib = lib if lib is not None else load_libcuda()
        self._fn: dict[str, Any] = {}
        for name, argtypes in (_PROTOTYPES | _OPTIONAL_PROTOTYPES).items():
            function = getattr(self._lib, name, None)
            if function is None:
                if name in _OPTIONAL_PROTOTYPES:
                    continue
                raise GpuUnavailable(
                    f"VRAM budget: {LIBCUDA} has no {name}; the NVIDIA driver is too old (CUDA 11+ is needed)"
                )
            function.argtypes = argtypes
            function.restype = ctypes.c_int
            self._fn[name] = function

    def error_name(self, code: int) -> str:
        name = ctypes.c_char_p()
        if self._fn["cuGetErrorName"](code, ctypes.byref(name)) != CUDA_SUCCESS or not name.value:
            return f"CUresult {code}"
        return name.value.decode(errors="replace")

    def _call(self, name: str, *args: Any) -> int:
        return int(self._fn[name](*args))

    def check(self, name: str, result: int) -> None:
        if result == CUDA_SUCCESS:
            return
        error = self.error_name(result)
        hint = _HINTS.get(error)
        raise GpuUnavailable(f"CUDA driver call {name} failed: {error} ({result})" + (f"; {hint}" if hint else ""))

    def init(self) -> None:
        self.check("cuInit", self._call("cuInit", 0))

    def device_count(self) -> int:
        count = ctypes.c_int()
        self.check("cuDeviceGetCount", self._call("cuDeviceGetCount", ctypes.byref(count)))
        return count.value

    def device(self, ordinal: int) -> int:
        device = ctypes.c_int()
        self.check(f"cuDeviceGet({ordinal})", self._call("cuDeviceGet", ctypes.byref(device), ordinal))
        return device.value

    def device_name(self, device: int) -> str:
        buffer = ctypes.create_string_buffer(256)
        self.check("cuDeviceGetName", self._call("cuDeviceGetName", buffer, len(buffer), device))
        return buffer.value.decode(errors="replace")

    def device_uuid(self, device: int) -> str:
        """"GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" as NVML prints it; '' if the driver can't say."""
        name = next((n for n in ("cuDeviceGetUuid_v2", "cuDeviceGetUuid") if n in self._fn), None)
        if name is None:
            return ""
        raw = (ctypes.c_ubyte * 16)()
        if self._call(name, ctypes.byref(raw), device) != CUDA_SUCCESS:
            return ""
        return format_uuid(bytes(raw))

    def retain_primary_context(self, device: int) -> int:
        context = ctypes.c_void_p()
        self.check("cuDevicePrimaryCtxRetain", self._call("cuDevicePrimaryCtxRetain", ctypes.byref(context), device))
        return int(context.value or 0)

    def release_primary_context(self, device: int) -> None:
        self.check("cuDevicePrimaryCtxRelease_v2", self._call("cuDevicePrimaryCtxRelease_v2", device))

    def push_context(self, context: int) -> None:
        self.check("cuCtxPushCurrent_v2", self._call("cuCtxPushCurrent_v2", ctypes.c_void_p(context)))

    def pop_context(self) -> None:
        popped = ctypes.c_void_p()
        self.check("cuCtxPopCurrent_v2", self._call("cuCtxPopCurrent_v2", ctypes.byref(popped)))

    def mem_get_info(self) -> tuple[int, int]:
        """(free, total) bytes of the current context's device."""
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        self.check("cuMemGetInfo_v2", self._call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total)))
        return free.value, total.value

    def mem_alloc(self, size: int) -> int | None:
        """A device pointer to ``size`` bytes, or ``None`` on CUDA_ERROR_OUT_OF_MEMORY."""
        pointer = ctypes.c_uint64()
        result = self._call("cuMemAlloc_v2", ctypes.byref(pointer), size)
        if result == CUDA_ERROR_OUT_OF_MEMORY:
            return None
        self.check(f"cuMemAlloc_v2({size})", result)
        return pointer.value

    def mem_free(self, pointer: int) -> None:
        self.check("cuMemFree_v2", self._call("cuMemFree_v2", pointer))


def format_uuid(raw: bytes) -> str:
    """16 UUID bytes as NVML's "GPU-8-4-4-4-12" hex string."""
    text = raw.hex()
    return f"GPU-{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:32]}"


def fill(
    alloc: Callable[[int], int | None],
    target: int,
    held: list[tuple[int, int]],
    *,
    chunk: int = CHUNK_BYTES,
    min_chunk: int = MIN_CHUNK_BYTES,
) -> int:
    """Allocate about ``target`` bytes with ``alloc(size) -> pointer | None (out of memory)``.

    Chunks start at ``chunk`` bytes, shrink to the rest (rounded down to ``min_chunk``) and
    halve on out-of-memory until ``min_chunk`` fails too. Appends (pointer, size) to ``held``
    as it goes, so a caller can free them even if ``alloc`` raises. Returns the bytes held.
    """
    remaining = target
    size = chunk
    while remaining >= min_chunk:
        size = min(size, remaining // min_chunk * min_chunk)
        pointer = alloc(size)
        if pointer is None:
            if size <= min_chunk:
                break
            size = max(min_chunk, size // 2 // min_chunk * min_chunk)
            continue
        held.append((pointer, size))
        remaining -= size
    return target - remaining


@dataclasses.dataclass
class DeviceHold:
    """What a ``VramBallast`` holds on one device; readable after release.

    ``ordinal`` is the CUDA ordinal in this process; ``free_before`` is the free memory
    once this process's context exists, ``free_after`` re-read after allocating (≈ budget).
    """

    ordinal: int
    name: str = ""
    uuid: str = ""
    total_bytes: int = 0
    free_before: int = 0
    held_bytes: int = 0
    free_after: int = 0
    chunks: int = 0
    device: int = dataclasses.field(default=0, repr=False)  # CUdevice
    context: int = dataclasses.field(default=0, repr=False)  # retained primary context; 0: none
    pointers: list[tuple[int, int]] = dataclasses.field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, object]:
        return {
            "cuda_ordinal": self.ordinal,
            "name": self.name,
            "uuid": self.uuid,
            "total_bytes": self.total_bytes,
            "free_before": self.free_before,
            "held_bytes": self.held_bytes,
            "free_after": self.free_after,
            "chunks": self.chunks,
        }


class VramBallast:
    """Hold all but ``budget_bytes`` of free memory on each GPU while the context is entered.

    ``devices``: hold the budget on every one of them (found by UUID); ``None``: on the
    CUDA ordinal ``device_index`` only (default 0), as before devices existed.

    After ``acquire()`` (or ``with``), ``holds`` has one ``DeviceHold`` per device. For one
    device the flat attributes are that device's: ``total_bytes``, ``free_before`` (free
    memory once this process's context exists), ``held_bytes`` (allocated here),
    ``free_after`` (free memory re-read after allocating, ≈ ``budget_bytes``), ``chunks``;
    for several they are sums, and ``device_index``/``device_name``/``device_uuid`` are the
    first device's. These stay readable after release.
    """

    def __init__(self, budget_bytes: int, device_index: int = 0, *, devices: Sequence[Device] | None = None) -> None:
        if budget_bytes < 0:
            raise ConfigError(f"VRAM budget must be >= 0 bytes, got {budget_bytes}")
        if device_index < 0:
            raise ConfigError(f"VRAM budget: device index must be >= 0, got {device_index}")
        if devices is not None:
            if not devices:
                raise ConfigError("VRAM budget: no device given to hold it on (an empty device selection)")
            uuids = [d.uuid.lower() for d in devices]
            if "" in uuids or len(set(uuids)) != len(uuids):
                raise ConfigError(
                    "VRAM budget: every device needs a UUID and may be given once, got "
                    + ", ".join(repr(d.uuid) for d in devices)
                )
        self.budget_bytes = budget_bytes
        self.devices: tuple[Device, ...] | None = None if devices is None else tuple(devices)
        self._device_index = device_index
        self.holds: list[DeviceHold] = []
        self._driver: CudaDriver | None = None

    # -- totals (one device: its values) ----------------------------------------------------

    @property
    def device_index(self) -> int:
        """CUDA ordinal of the (first) device: as given, or as found by UUID; -1 before that."""
        if self.holds:
            return self.holds[0].ordinal
        return self._device_index if self.devices is None else -1

    @property
    def device_name(self) -> str:
        return self.holds[0].name if self.holds else ""

    @property
    def device_uuid(self) -> str:
        return self.holds[0].uuid if self.holds else ""

    @property
    def total_bytes(self) -> int:
        return sum(h.total_bytes for h in self.holds)

    @property
    def free_before(self) -> int:
        return sum(h.free_before for h in self.holds)

    @property
    def held_bytes(self) -> int:
        return sum(h.held_bytes for h in self.holds)

    @property
    def free_after(self) -> int:
        return sum(h.free_after for h in self.holds)

    @property
    def chunks(self) -> int:
        return sum(h.chunks for h in self.holds)

    @property
    def is_held(self) -> bool:
        return self._driver is not None

    # -- hold and release ------------------------------------------------------------------

    def acquire(self) -> VramBallast:
        """Find the devices, then retain a context on each and allocate; on any failure nothing
        stays held on any device."""
        if self._driver is not None:
            raise RuntimeError("VramBallast is already held")
        driver = CudaDriver()
        driver.init()
        targets = self._resolve(driver)
        self.holds = []
        self._driver = driver
        try:
            for ordinal, device in targets:
                hold = DeviceHold(ordinal, driver.device_name(device), driver.device_uuid(device), device=device)
                self.holds.append(hold)
                hold.context = driver.retain_primary_context(device)
                self._allocate(driver, hold)
        except BaseException:
            self._release_quietly()
            raise
        return self

    def _resolve(self, driver: CudaDriver) -> list[tuple[int, int]]:
        """(CUDA ordinal, CUdevice) of each device to hold memory on, found before holding any."""
        if self.devices is None:
            return [(self._device_index, driver.device(self._device_index))]
        visible: dict[str, tuple[int, int]] = {}
        for ordinal in range(driver.device_count()):
            device = driver.device(ordinal)
            visible[driver.device_uuid(device).lower()] = (ordinal, device)
        targets = []
        for wanted in self.devices:
            found = visible.get(wanted.uuid.lower())
            if found is None:
                raise GpuUnavailable(
                    f"VRAM budget: no CUDA device visible to this process has UUID {wanted.uuid} "
                    f"(NVML index {wanted.index}{', ' + wanted.name if wanted.name else ''}); CUDA sees "
                    f"{', '.join(sorted(u for u in visible if u)) or 'no device with a UUID'}. Check "
                    "CUDA_VISIBLE_DEVICES of this process; nothing was held"
                )
            targets.append(found)
        return targets

    def _allocate(self, driver: CudaDriver, hold: DeviceHold) -> None:
        with self._current(driver, hold.context):
            hold.free_before, hold.total_bytes = driver.mem_get_info()
            if self.budget_bytes > hold.free_before:
                raise GpuUnavailable(
                    f"VRAM budget {self.budget_bytes / GIB:.2f} GiB is more than the {hold.free_before / GIB:.2f} "
                    f"GiB free on CUDA device {hold.ordinal} ({hold.name}, "
                    f"{hold.total_bytes / GIB:.2f} GiB total); nothing was held. Lower the budget or stop "
                    "the other processes using the GPU (nvidia-smi)"
                )
            hold.held_bytes = fill(driver.mem_alloc, hold.free_before - self.budget_bytes, hold.pointers)
            hold.chunks = len(hold.pointers)
            hold.free_after, _ = driver.mem_get_info()

    @staticmethod
    @contextlib.contextmanager
    def _current(driver: CudaDriver, context: int) -> Iterator[None]:
        """Make a primary context current on this thread for the block."""
        driver.push_context(context)
        try:
            yield
        finally:
            driver.pop_context()

    def release(self) -> None:
        """Free every chunk and release every context; raises ``GpuUnavailable`` if a call failed
        (after trying all of them, on every device). Safe to call when not held."""
        driver = self._driver
        if driver is None:
            return
        failures: list[str] = []
        for hold in self.holds:
            if hold.pointers:
                try:
                    with self._current(driver, hold.context):
                        for pointer, _size in hold.pointers:
                            _collect(failures, driver.mem_free, pointer)
                except GpuUnavailable as exc:
                    failures.append(str(exc))
                hold.pointers = []
            if hold.context:
                _collect(failures, driver.release_primary_context, hold.device)
                hold.context = 0
        self._driver = None
        if failures:
            raise GpuUnavailable("releasing the VRAM ballast failed: " + "; ".join(failures))

    def _release_quietly(self) -> None:
        with contextlib.suppress(GpuUnavailable):
            self.release()

    def __enter__(self) -> VramBallast:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            self.release()
        except GpuUnavailable as err:
            if exc is None:
                raise
            warnings.warn(str(err), RuntimeWarning, stacklevel=2)  # keep the original exception

    def as_dict(self) -> dict[str, object]:
        """The flat keys (totals, see the class) and ``devices``: one entry per device held."""
        return {
            "budget_bytes": self.budget_bytes,
            "device_index": self.device_index,
            "device_name": self.device_name,
            "device_uuid": self.device_uuid,
            "total_bytes": self.total_bytes,
            "free_before": self.free_before,
            "held_bytes": self.held_bytes,
            "free_after": self.free_after,
            "chunks": self.chunks,
            "devices": [hold.as_dict() for hold in self.holds],
        }


def _collect(failures: list[str], function: Callable[[int], None], argument: int) -> None:
    try:
        function(argument)
    except GpuUnavailable as exc:
        failures.append(str(exc))
