"""What must match for two reports to be comparable, and what differs when it does not.

Derived from ``RunReport.fingerprint`` (host CPU, GPU names, llama.cpp builds, models'
sha256 by name) and from its results (``ResultEntry.build`` when the fingerprint lists no
build, ``ResultEntry.threads`` per config).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from pytest_llamabench.errors import ConfigError
from pytest_llamabench.results import RunReport

#: What ``compare`` does when the fingerprints differ.
FINGERPRINT_POLICIES = ("refuse", "warn")


class FingerprintMismatch(ConfigError):
    """The two reports were measured on different hardware, builds, models or threads."""

    kind = "fingerprint"


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """The comparable part of a report's fingerprint; None means unknown."""

    host_cpu: str | None = None
    gpus: tuple[str, ...] | None = None
    builds: tuple[str, ...] | None = None
    models: Mapping[str, str] = dataclasses.field(default_factory=dict)  # name -> sha256

    @classmethod
    def of(cls, report: RunReport) -> Fingerprint:
        data = report.fingerprint
        host, models = _mapping(data.get("host")), _mapping(data.get("models"))
        gpus, builds = data.get("gpus"), data.get("llama_cpp_builds")
        listed = tuple(sorted(map(str, builds))) if isinstance(builds, list) else ()
        result_builds = tuple(sorted({r.build for r in report.results if r.build}))
        return cls(
            host_cpu=_opt_str(host.get("cpu")),
            gpus=tuple(sorted(_gpu_name(g) for g in gpus)) if isinstance(gpus, list) else None,
            # [] means no server started (every config failed to launch): unknown, not another build
            builds=listed or result_builds or None,
            models={
                str(name): str(m["sha256"])
                for name, m in models.items()
                if isinstance(m, Mapping) and m.get("sha256")
            },
        )


@dataclasses.dataclass(frozen=True)
class Mismatch:
    """One fingerprint field that differs; ``configs`` None means it affects every row."""

    field: str
    base: str
    new: str
    configs: frozenset[str] | None = None

    def __str__(self) -> str:
        return f"{self.field}: {self.base} → {self.new}"


def fingerprint_mismatches(base: RunReport, new: RunReport) -> list[Mismatch]:
    """GPU names, llama.cpp builds, model sha256s, host CPU and server threads that differ."""
    fa, fb = Fingerprint.of(base), Fingerprint.of(new)
    found: list[Mismatch] = []
    pairs: list[tuple[str, object, object]] = [
        ("gpus", fa.gpus, fb.gpus),
        ("llama_cpp_builds", fa.builds, fb.builds),
        ("host.cpu", fa.host_cpu, fb.host_cpu),
    ]
    pairs += [(f"models.{m}.sha256", fa.models[m], fb.models[m]) for m in sorted(fa.models.keys() & fb.models.keys())]
    for field, a, b in pairs:
        if a is not None and b is not None and a != b:
            found.append(Mismatch(field, _show(a), _show(b)))
    base_results, new_results = base.index(), new.index()
    threads: dict[str, tuple[int, int]] = {}
    for key in sorted(base_results.keys() & new_results.keys()):
        ta, tb = base_results[key].threads, new_results[key].threads
        if ta is not None and tb is not None and ta != tb:
            threads.setdefault(key[0], (ta, tb))
    for config, (ta, tb) in threads.items():
        found.append(Mismatch(f"configs.{config}.threads", str(ta), str(tb), frozenset({config})))
    return found


def refusal(base: RunReport, new: RunReport, mismatches: list[Mismatch]) -> str:
    """The message of a FingerprintMismatch: what differs and how to compare anyway."""
    lines = "\n".join(f"  {m}" for m in mismatches)
    return (
        f"{base.source} and {new.source} were measured on different setups:\n{lines}\n"
        f"Differences in hardware, build, model or threads would show up as regressions. Compare "
        f"reports from the same setup, or pass --llamabench-fingerprint=warn (compare: --fingerprint "
        f"warn) to compare anyway."
    )


def _show(value: object) -> str:
    if isinstance(value, tuple):
        return ", ".join(map(str, value)) if value else "none"
    return str(value)


def _gpu_name(gpu: object) -> str:
    return str(gpu.get("name", "?")) if isinstance(gpu, Mapping) else str(gpu)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _opt_str(value: object) -> str | None:
    return str(value) if value not in (None, "") else None


__all__ = ["FINGERPRINT_POLICIES", "Fingerprint", "FingerprintMismatch", "Mismatch", "fingerprint_mismatches"]
