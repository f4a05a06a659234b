"""Which GPUs a benchmark uses: ``Device`` values, found through NVML and handed down
to the VRAM ballast, the VRAM sampler and the server launchers.

A ``Device`` is identified by its UUID (stable across reboots and independent of any
ordering) and carries NVML's index (PCI bus order) for display. Nothing here changes
the default: code that gets ``devices=None`` behaves as before (all devices, CUDA
ordinal 0 for the ballast).

``discover_devices()`` honours the user's ``CUDA_VISIBLE_DEVICES`` the way CUDA reads
it: a comma-separated list of indices or ``GPU-...`` UUIDs (a UUID may be shortened to
any unique prefix); ``""`` or ``-1`` hides every GPU. Indices are taken as NVML's, i.e.
PCI bus order; CUDA agrees when ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (its default,
fastest-first, differs only on machines that mix GPU models). MIG instances
(``MIG-...``) are not supported. A server is then started with
``visible_devices_env(devices)``: the chosen devices by UUID, so no ordering question
remains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from pytest_llamabench.errors import ConfigError

VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"
DEVICE_ORDER = "CUDA_DEVICE_ORDER"


@dataclasses.dataclass(frozen=True)
class Device:
    """One NVIDIA GPU: ``uuid`` as NVML prints it (``GPU-xxxxxxxx-...``), NVML ``index``."""

    index: int
    uuid: str
    name: str = ""

    def __str__(self) -> str:
        return f"{self.index}: {self.name or 'GPU'} ({self.uuid})"


def select_visible(present: Sequence[Device], value: str) -> list[Device]:
    """``present`` filtered and ordered by a ``CUDA_VISIBLE_DEVICES`` value."""
    if _hides_all(value):
        return []
    chosen: list[Device] = []
    for raw in value.split(","):
        entry = raw.strip()
        device = _match(present, entry, value)
        if device in chosen:
            raise ConfigError(
                f"{VISIBLE_DEVICES}={value!r}: entry {entry!r} names {device.uuid} a second time; "
                "list each GPU once"
            )
        chosen.append(device)
    return chosen


def visible_devices_env(devices: Sequence[Device]) -> dict[str, str]:
    """Environment for a process that must see exactly ``devices`` (by UUID, in this order)."""
    return {
        VISIBLE_DEVICES: ",".join(d.uuid or str(d.index) for d in devices),  # index: PCI order, set below
        DEVICE_ORDER: "PCI_BUS_ID",
    }


def _hides_all(value: str) -> bool:
    return value.strip() in ("", "-1")


def _match(present: Sequence[Device], entry: str, value: str) -> Device:
    if entry.isdecimal():
        matches = [d for d in present if d.index == int(entry)]
    elif entry.upper().startswith("GPU-") and len(entry) > len("GPU-"):
        matches = [d for d in present if d.uuid.lower().startswith(entry.lower())]
    else:
        matches = []
    if len(matches) == 1:
        return matches[0]
    listing = "; ".join(map(str, present)) or "none (NVML lists no GPU)"
    problem = "matches several GPUs; give more of the UUID" if matches else "matches no GPU"
    raise ConfigError(
        f"{VISIBLE_DEVICES}={value!r}: entry {entry!r} {problem}. GPUs present (NVML index: name (UUID)): "
        f"{listing}. Use indices or GPU-... UUIDs from that list (MIG instances are not supported), "
        f"or unset {VISIBLE_DEVICES} to use all of them"
    )


__all__ = ["Device", "select_visible", "visible_devices_env"]
