"""The JSON report: one entry per config x workload, rewritten atomically after every test.

Schema: ``pytest_llamabench/schema/report.schema.json`` (``schema_version`` 1).
Only the process that owns the run (the xdist controller, or the only process)
writes it; workers send builtin-typed entries through report user_properties.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_llamabench import __version__

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("schema") / "report.schema.json"
OUTCOMES = ("passed", "failed", "xfailed", "xpassed", "skipped", "error")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def host_fingerprint() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = [f for f in line.split(":", 1)[1].split() if f in ("avx", "avx2", "fma", "f16c", "avx512f")]
    except OSError:
        pass
    from pytest_llamabench.model.files import host_memory_bytes

    return {
        "cpu": cpu,
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "memory_mib": round(host_memory_bytes() / 2**20),
        "os": f"{platform.system()} {platform.release()}",
        "python": sys.version.split()[0],
    }


def outcome_of(when: str, outcome: str, wasxfail: str | None, longrepr: str) -> tuple[str, str | None]:
    """Map one pytest report phase to (outcome, reason)."""
    if wasxfail is not None:
        return ("xfailed", wasxfail) if outcome == "skipped" else ("xpassed", wasxfail)
    if outcome == "failed":
        if when != "call":
            return "error", _first_line(longrepr)
        return "failed", _first_line(longrepr)
    if outcome == "skipped":
        return "skipped", _skip_reason(longrepr)
    return "passed", None


def _skip_reason(longrepr: str) -> str:
    m = re.search(r"Skipped: (.*?)['\"]?\)?$", longrepr)
    return m.group(1) if m else longrepr[-300:]


def _first_line(longrepr: str) -> str:
    lines = [line for line in longrepr.splitlines() if line.startswith("E ")]
    return (lines[0][1:].strip() if lines else longrepr.strip().splitlines()[-1] if longrepr.strip() else "")[:500]


class Report:
    """Accumulates results and writes the JSON file atomically after each change."""

    def __init__(self, path: Path, *, matrix_files: list[str], fingerprint: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION,
            "plugin_version": __version__,
            "started_at": now(),
            "updated_at": now(),
            "finished": False,
            "matrix_files": matrix_files,
            "fingerprint": fingerprint,
            "results": [],
        }
        self._by_test: dict[str, dict[str, Any]] = {}

    def update(self, test: str, phase: Mapping[str, Any]) -> dict[str, Any] | None:
        """Merge what one report phase says about ``test``; the worst outcome wins.

        A test enters ``results`` with its first outcome (a passed setup has none yet),
        so an interrupted test never shows up as passed.
        """
        entry = self._by_test.setdefault(test, {"test": test, "config": None, "workload": None, "outcome": None,
                                                "reason": None, "failure": None, "metrics": {}})  # fmt: skip
        for key, value in phase.items():
            if key not in ("outcome", "reason") and value is not None:
                entry[key] = value
        outcome = phase.get("outcome")
        if outcome and (entry["outcome"] is None or _rank(outcome) > _rank(entry["outcome"])):
            if entry["outcome"] is None:
                self.data["results"].append(entry)
            entry["outcome"], entry["reason"] = outcome, phase.get("reason")
        self._refresh_fingerprint()
        return entry if entry["outcome"] else None

    def _refresh_fingerprint(self) -> None:
        builds = sorted({r["server"]["build_info"] for r in self.data["results"]
                         if r.get("server") and r["server"].get("build_info")})  # fmt: skip
        models = {r["model"]["file"]: r["model"] for r in self.data["results"] if r.get("model")}
        self.data["fingerprint"]["llama_cpp_builds"] = builds
        self.data["fingerprint"]["models"] = models

    def write(self, *, finished: bool = False) -> None:
        self.data["updated_at"] = now()
        self.data["finished"] = finished
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, sort_keys=False, default=str))
        os.replace(tmp, self.path)  # readers see the old or the new file, never half of one

    @property
    def results(self) -> list[dict[str, Any]]:
        return list(self.data["results"])


def _rank(outcome: str) -> int:
    return {"passed": 0, "skipped": 1, "xfailed": 2, "xpassed": 3, "failed": 4, "error": 5}.get(outcome, 0)
