"""What the NVIDIA GPUs are and how much memory a server uses, through NVML (``pynvml``).

``pynvml`` comes from the ``nvidia-ml-py`` package and is imported lazily, so that a
machine without it (or without a driver) only gets ``probe_gpu().available == False``.
Every function here pairs its own ``nvmlInit`` with an ``nvmlShutdown``; NVML counts
references, so any number of them may overlap or repeat.

NVML does not honour ``CUDA_VISIBLE_DEVICES``: indices here are NVML's (PCI bus order).
Set ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` for CUDA ordinals to agree with them, or match by UUID.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Callable, Iterator, Mapping
from types import ModuleType
from typing import Any

from pytest_llamabench.errors import GpuUnavailable

from pytest_llamabench.hardware.device import VISIBLE_DEVICES, Device, _hides_all, select_visible

MIB = 1024 * 1024

# NVML return codes (nvml.h; stable ABI).
_NVML_ERROR_DRIVER_NOT_LOADED = 9
_NVML_ERROR_LIBRARY_NOT_FOUND = 12
_NVML_ERROR_FUNCTION_NOT_FOUND = 13

REASON_NO_PYNVML = "pynvml not importable (install the nvidia-ml-py package)"
REASON_NO_LIBRARY = "NVML library not found (no NVIDIA driver installed)"
REASON_DRIVER_NOT_LOADED = "driver not loaded"
REASON_NO_DEVICE = "no NVIDIA device"

_FIXES = {
    REASON_NO_PYNVML: "pip install nvidia-ml-py",
    REASON_NO_LIBRARY: "install the NVIDIA driver (libnvidia-ml.so.1); in a container, run it with the "
    "NVIDIA container toolkit (docker run --gpus all)",
    REASON_DRIVER_NOT_LOADED: "load the kernel module (sudo modprobe nvidia) or reboot; `nvidia-smi` must work",
    REASON_NO_DEVICE: "run on a machine with an NVIDIA GPU, or select a CPU config",
}



# -- NVML access -------------------------------------------------------------------


def _pynvml() -> ModuleType:
    """The ``pynvml`` module (looked up on each call, so tests can swap it)."""
    return importlib.import_module("pynvml")


def _is_nvml_error(nv: ModuleType, exc: BaseException) -> bool:
    return isinstance(exc, nv.NVMLError)


def _open_nvml() -> ModuleType:
    """Import pynvml and ``nvmlInit``; pair with ``_shutdown``. Raises ImportError or NVMLError."""
    nv = _pynvml()
    nv.nvmlInit()
    return nv


@contextlib.contextmanager
def nvml_session() -> Iterator[ModuleType]:
    """``nvmlInit`` ... ``nvmlShutdown``. Raises ``ImportError`` or ``pynvml.NVMLError``."""
    nv = _open_nvml()
    try:
        yield nv
    finally:
        _shutdown(nv)


def _shutdown(nv: ModuleType) -> None:
    try:
        nv.nvmlShutdown()
    except Exception as exc:  # shutting down must never hide the real outcome
        if not _is_nvml_error(nv, exc):
            raise


def describe_nvml_error(exc: BaseException) -> str:
    """The reason ``probe_gpu`` reports for an exception from ``import pynvml`` or NVML."""
    if isinstance(exc, ImportError):
        return REASON_NO_PYNVML
    code = getattr(exc, "value", None)
    if code == _NVML_ERROR_LIBRARY_NOT_FOUND:
        return REASON_NO_LIBRARY
    if code == _NVML_ERROR_DRIVER_NOT_LOADED:
        return REASON_DRIVER_NOT_LOADED
    return f"NVML error: {exc}"


# -- probe ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GpuStatus:
    """Whether NVML sees a usable NVIDIA GPU; ``reason`` says why not (or how many there are)."""

    available: bool
    reason: str
    device_count: int = 0

    @property
    def fix(self) -> str:
        """How to make the GPU usable ('' when it is, or when there is no standard fix)."""
        if self.available:
            return ""
        return _FIXES.get(self.reason, "check that `nvidia-smi` works on this machine")


def probe_gpu() -> GpuStatus:
    """Ask NVML for the device count. Never raises; cheap, but callers should cache it."""
    try:
        with nvml_session() as nv:
            count = int(nv.nvmlDeviceGetCount())
    except Exception as exc:  # ImportError, NVMLError, or a broken pynvml: all mean "no GPU"
        return GpuStatus(False, describe_nvml_error(exc))
    if count <= 0:
        return GpuStatus(False, REASON_NO_DEVICE)
    return GpuStatus(True, f"{count} NVIDIA device{'s' if count != 1 else ''}", count)


def require_gpu(status: GpuStatus | None = None) -> GpuStatus:
    """``status`` (default: a fresh probe) if a GPU is usable, else raise ``GpuUnavailable``."""
    status = status if status is not None else probe_gpu()
    if not status.available:
        raise GpuUnavailable(f"a GPU is required but none is usable: {status.reason}; fix: {status.fix}")
    return status


# -- snapshot ------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GpuSnapshot:
    """One device's identity and state at one moment. ``None``: NVML does not report it here."""

    index: int
    name: str
    uuid: str
    driver: str
    cuda: str  # driver's CUDA version, "13.0"; "" if unknown
    memory_total_mib: float
    memory_free_mib: float
    memory_used_mib: float
    sm_clock_mhz: int | None
    mem_clock_mhz: int | None
    temperature_c: int | None
    power_w: float | None

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def snapshot_gpus() -> list[GpuSnapshot]:
    """Every device NVML sees; ``[]`` when NVML is unavailable (``probe_gpu()`` says why).

    Raises ``GpuUnavailable`` only if NVML works but a present device cannot be read
    (e.g. "GPU is lost").
    """
    try:
        nv = _open_nvml()
    except Exception:
        return []
    try:
        driver = _text(_optional(nv, nv.nvmlSystemGetDriverVersion) or "")
        cuda = _cuda_version(nv)
        return [_snapshot_one(nv, i, driver, cuda) for i in range(int(nv.nvmlDeviceGetCount()))]
    except Exception as exc:
        if not _is_nvml_error(nv, exc):
            raise
        raise GpuUnavailable(
            f"NVML could not read the GPUs: {exc}; check `nvidia-smi` (a lost GPU needs a reset or reboot)"
        ) from exc
    finally:
        _shutdown(nv)


def _snapshot_one(nv: ModuleType, index: int, driver: str, cuda: str) -> GpuSnapshot:
    handle = nv.nvmlDeviceGetHandleByIndex(index)
    memory = nv.nvmlDeviceGetMemoryInfo(handle)
    power_mw = _optional(nv, nv.nvmlDeviceGetPowerUsage, handle)
    return GpuSnapshot(
        index=index,
        name=_text(nv.nvmlDeviceGetName(handle)),
        uuid=_text(_optional(nv, nv.nvmlDeviceGetUUID, handle) or ""),
        driver=driver,
        cuda=cuda,
        memory_total_mib=int(memory.total) / MIB,
        memory_free_mib=int(memory.free) / MIB,
        memory_used_mib=int(memory.used) / MIB,
        sm_clock_mhz=_optional_int(_optional(nv, nv.nvmlDeviceGetClockInfo, handle, nv.NVML_CLOCK_SM)),
        mem_clock_mhz=_optional_int(_optional(nv, nv.nvmlDeviceGetClockInfo, handle, nv.NVML_CLOCK_MEM)),
        temperature_c=_optional_int(
            _optional(nv, nv.nvmlDeviceGetTemperature, handle, nv.NVML_TEMPERATURE_GPU)
        ),
        power_w=None if power_mw is None else int(power_mw) / 1000.0,
    )


def _cuda_version(nv: ModuleType) -> str:
    """The driver's CUDA version as "13.0" (NVML gives 13000), or ''."""
    for name in ("nvmlSystemGetCudaDriverVersion_v2", "nvmlSystemGetCudaDriverVersion"):
        function = getattr(nv, name, None)
        value = None if function is None else _optional(nv, function)
        if value:
            return format_cuda_version(int(value))
    return ""


def format_cuda_version(value: int) -> str:
    """NVML/CUDA integer version (major*1000 + minor*10) as "major.minor"."""
    return f"{value // 1000}.{value % 1000 // 10}"


def _optional(nv: ModuleType, function: Callable[..., Any], *args: Any) -> Any:
    """``function(*args)``, or ``None`` where NVML answers with an error (not supported, ...)."""
    try:
        return function(*args)
    except Exception as exc:
        if not _is_nvml_error(nv, exc):
            raise
        return None


def _optional_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


# -- VRAM sampler ----------------------------------------------------------------------


def discover_devices(environ: Mapping[str, str] | None = None) -> list[Device]:
    """The GPUs this process may use: every device NVML sees, filtered and ordered by
    ``CUDA_VISIBLE_DEVICES`` of ``environ`` (default ``os.environ``) when it is set.

    Raises ``GpuUnavailable`` when NVML is unusable (unless the variable hides every GPU,
    which needs no NVML), ``ConfigError`` when an entry matches no GPU.
    """
    value = (os.environ if environ is None else environ).get(VISIBLE_DEVICES)
    if value is not None and _hides_all(value):
        return []
    require_gpu()
    present = [Device(s.index, s.uuid, s.name) for s in snapshot_gpus()]
    return present if value is None else select_visible(present, value)
