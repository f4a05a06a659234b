"""The typed result record: one ``ResultEntry`` per config x workload, one ``RunReport`` per run.

Everything downstream of a measurement reads these: the JSON report, the results table,
pytest-benchmark's ``extra_info`` and the regression gate. The JSON is a projection of the
objects (``as_dict``) and is read back by the same module (``from_dict``, ``load``), for our
reports (``schema_version`` 1, ``schema/report.schema.json``) and for pytest-benchmark's
``--benchmark-json`` files alike.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pytest_llamabench import __version__
from pytest_llamabench.errors import ConfigError, LlamabenchError, ServerOutOfMemory
from pytest_llamabench.stats import Summary, is_number

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).with_name("schema") / "report.schema.json"
OUTCOMES = ("passed", "failed", "xfailed", "xpassed", "skipped", "error")
#: Outcomes whose measurements count; outcomes that are failures of this run.
OK_OUTCOMES = frozenset({"passed", "xpassed"})
FAILING_OUTCOMES = frozenset({"failed", "error"})
_RANK = {"passed": 0, "skipped": 1, "xfailed": 2, "xpassed": 3, "failed": 4, "error": 5}


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


@dataclasses.dataclass(frozen=True)
class Failure:
    """Why a result failed: the error's stable ``kind`` (errors.py), its message and details."""

    kind: str
    message: str
    detail: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_exception(cls, exc: LlamabenchError) -> Failure:
        detail: dict[str, Any] = {}
        if isinstance(exc, ServerOutOfMemory):
            detail = {"device": exc.device, "requested_mib": exc.requested_mib, "buffer": exc.buffer}
        return cls(exc.kind, exc.message, detail)

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message, "detail": dict(self.detail)}

    @classmethod
    def from_json(cls, value: object) -> Failure | None:
        if not isinstance(value, Mapping) or not isinstance(value.get("kind"), str):
            return None
        return cls(value["kind"], str(value.get("message") or ""), dict(_mapping(value.get("detail"))))


#: Descriptive fields of a result kept as JSON objects (free-form facts about the run).
_FACTS = ("server", "model", "workload_spec", "thresholds", "binary", "host_load", "details")


@dataclasses.dataclass
class ResultEntry:
    """One test of the matrix (config x workload): outcome, failure, metrics and the facts around it.

    ``outcome`` is None until a report phase gave one; an interrupted test never shows as passed.
    """

    test: str
    config: str | None = None
    workload: str | None = None
    outcome: str | None = None
    reason: str | None = None
    failure: Failure | None = None
    metrics: dict[str, Summary] = dataclasses.field(default_factory=dict)
    start: int | None = None  # which fresh server (1..restarts) when a config had several
    description: str | None = None
    expect: str | None = None
    endpoint: str | None = None
    duration_s: float | None = None
    server: dict[str, Any] | None = None
    model: dict[str, Any] | None = None
    workload_spec: dict[str, Any] | None = None
    thresholds: dict[str, Any] | None = None
    binary: dict[str, Any] | None = None
    #: CPU time other processes took while this was measured (``hardware.host.CpuContention``)
    host_load: dict[str, Any] | None = None
    #: what the workload kind recorded: sampling the server used, reasoning/answer split, template check
    details: dict[str, Any] | None = None
    #: keys this version does not know, kept so a report read and written loses nothing
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    # -- reading ---------------------------------------------------------------------

    def median(self, metric: str) -> float | None:
        summary = self.metrics.get(metric)
        return summary.median if summary is not None else None

    def peak(self, metric: str) -> float | None:
        summary = self.metrics.get(metric)
        return summary.max if summary is not None else None

    def samples(self, metric: str) -> tuple[float, ...]:
        summary = self.metrics.get(metric)
        return summary.samples if summary is not None else ()

    @property
    def ok(self) -> bool:
        return self.outcome in OK_OUTCOMES

    @property
    def outcome_text(self) -> str:
        return f"{self.outcome} ({self.failure.kind})" if self.failure else str(self.outcome)

    @property
    def threads(self) -> int | None:
        threads = (self.server or {}).get("threads")
        return threads if isinstance(threads, int) and not isinstance(threads, bool) else None

    @property
    def build(self) -> str | None:
        build = (self.server or {}).get("build_info")
        return build if isinstance(build, str) else None

    # -- merging report phases -------------------------------------------------------

    def merge(self, phase: ResultEntry) -> bool:
        """Take what a later report phase says: set fields win, the worst outcome wins.

        Returns True when this entry got its first outcome.
        """
        first = False
        for field in dataclasses.fields(self):
            if field.name in ("test", "outcome", "reason", "metrics", "extra"):
                continue
            value = getattr(phase, field.name)
            if value is not None:
                setattr(self, field.name, value)
        self.metrics.update(phase.metrics)
        self.extra.update(phase.extra)
        if phase.outcome and (self.outcome is None or _RANK[phase.outcome] > _RANK[self.outcome]):
            first = self.outcome is None
            self.outcome, self.reason = phase.outcome, phase.reason
        return first

    # -- JSON ------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "test": self.test, "config": self.config, "workload": self.workload, "outcome": self.outcome,
            "reason": self.reason, "failure": self.failure.as_dict() if self.failure else None,
            "metrics": {name: summary.as_dict() for name, summary in self.metrics.items()},
        }  # fmt: skip
        for name in ("start", "description", "expect", "endpoint", "duration_s", *_FACTS):
            value = getattr(self, name)
            if value is not None:
                data[name] = value
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "result", *, strict: bool = True) -> ResultEntry:
        """Read one result object; ``strict`` requires config, workload and a known outcome."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: expected an object with config, workload, outcome and metrics")
        config, workload = data.get("config"), data.get("workload")
        outcome = data.get("outcome", "passed" if strict else None)
        if strict:
            if not isinstance(config, str) or not config or not isinstance(workload, str) or not workload:
                raise ConfigError(f"{where}: 'config' and 'workload' must be non-empty strings")
            if outcome not in OUTCOMES:
                raise ConfigError(f"{where}.outcome: {outcome!r} is not one of {', '.join(OUTCOMES)}")
        metrics = data.get("metrics") or {}
        if not isinstance(metrics, Mapping):
            raise ConfigError(f"{where}.metrics: expected an object of metric name -> summary")
        known = {f.name for f in dataclasses.fields(cls)}
        facts = {name: dict(data[name]) for name in _FACTS if isinstance(data.get(name), Mapping)}
        duration, start = data.get("duration_s"), data.get("start")
        return cls(
            test=str(data.get("test") or f"{config}-{workload}"),
            config=_opt_str(config),
            workload=_opt_str(workload),
            outcome=outcome if outcome in OUTCOMES else None,
            reason=_opt_str(data.get("reason")),
            failure=Failure.from_json(data.get("failure")),
            metrics={str(k): Summary.from_json(v, f"{where}.metrics.{k}") for k, v in metrics.items()},
            start=start if isinstance(start, int) and not isinstance(start, bool) else None,
            description=_opt_str(data.get("description")),
            expect=_opt_str(data.get("expect")),
            endpoint=_opt_str(data.get("endpoint")),
            duration_s=float(duration) if isinstance(duration, (int, float)) else None,
            **facts,
            extra={k: v for k, v in data.items() if k not in known},
        )


@dataclasses.dataclass
class RunReport:
    """One run: its fingerprint and results. ``kind`` says which file format it was read from."""

    fingerprint: dict[str, Any] = dataclasses.field(default_factory=dict)
    results: list[ResultEntry] = dataclasses.field(default_factory=list)
    matrix_files: list[str] = dataclasses.field(default_factory=list)
    started_at: str = dataclasses.field(default_factory=now)
    updated_at: str = dataclasses.field(default_factory=now)
    finished: bool = False
    #: why a run ended early (Ctrl-C, SIGTERM): its results are partial
    interrupted: str | None = None
    plugin_version: str = __version__
    binary: dict[str, Any] | None = None
    gate: dict[str, Any] | None = None
    source: str = "this run"
    kind: str = "llamabench"
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        self._by_test = {entry.test: entry for entry in self.results}

    # -- building during a run ----------------------------------------------------------

    def record(self, phase: ResultEntry) -> ResultEntry | None:
        """Merge one report phase into its test's entry; the entry once it has an outcome.

        A test enters ``results`` with its first outcome (a passed setup has none yet).
        """
        entry = self._by_test.get(phase.test)
        if entry is None:
            entry = self._by_test[phase.test] = ResultEntry(phase.test)
        if entry.merge(phase):
            self.results.append(entry)
        self._refresh_fingerprint()
        return entry if entry.outcome else None

    def _refresh_fingerprint(self) -> None:
        self.fingerprint["llama_cpp_builds"] = sorted({r.build for r in self.results if r.build})
        self.fingerprint["models"] = {r.model["file"]: r.model for r in self.results if r.model and "file" in r.model}

    # -- reading --------------------------------------------------------------------------

    def index(self) -> dict[tuple[str, str], ResultEntry]:
        """Results by (config, workload); a later duplicate replaces an earlier one."""
        return {(r.config, r.workload): r for r in self.results if r.config and r.workload}

    def per_unit(self) -> list[ResultEntry]:
        """One entry per (config, workload), the experimental unit being the server start.

        With several starts of a config, each per-repetition metric's samples become the
        per-start medians (repetitions inside one server agree far better than two fresh
        servers do), peaks become the maximum over starts, the worst outcome wins, the first
        failure is kept, and ``extra["starts"]`` says how many there were.
        """
        groups: dict[tuple[str | None, str | None], list[ResultEntry]] = {}
        for entry in self.results:
            key = (entry.config, entry.workload) if entry.config and entry.workload else (entry.test, None)
            groups.setdefault(key, []).append(entry)
        return [group[0] if len(group) == 1 else _pooled(group) for group in groups.values()]

    def configs(self) -> list[str]:
        return list(dict.fromkeys(r.config for r in self.results if r.config))

    def workloads(self) -> list[str]:
        return list(dict.fromkeys(r.workload for r in self.results if r.workload))

    # -- JSON ------------------------------------------------------------------------------

    def as_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "plugin_version": self.plugin_version,
            "started_at": self.started_at, "updated_at": self.updated_at, "finished": self.finished,
            "matrix_files": self.matrix_files, "fingerprint": self.fingerprint,
            "results": [r.as_dict() for r in self.results if r.outcome],
        }  # fmt: skip
        if self.interrupted is not None:
            data["interrupted"] = self.interrupted
        if self.binary is not None:
            data["binary"] = self.binary
        if self.gate is not None:
            data["gate"] = self.gate
        return {**data, **self.extra}

    def write(self, path: Path, *, finished: bool | None = None) -> None:
        """Atomically: readers see the old or the new file, never half of one."""
        self.updated_at = now()
        if finished is not None:
            self.finished = finished
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.as_dict(), indent=1, default=str))
        os.replace(tmp, path)

    @classmethod
    def from_dict(cls, data: object, *, source: str = "<report>") -> RunReport:
        """Ours (``schema_version``, ``results``) or pytest-benchmark's (``machine_info``, ``benchmarks``)."""
        if isinstance(data, Mapping) and "results" in data and "schema_version" in data:
            return _from_llamabench(data, source)
        if isinstance(data, Mapping) and "benchmarks" in data and "machine_info" in data:
            return _from_pytest_benchmark(data, source)
        raise ConfigError(
            f"{source}: not a pytest-llamabench report nor a pytest-benchmark JSON (expected top-level "
            f"keys 'schema_version' and 'results', or 'machine_info' and 'benchmarks'); pass the file "
            f"written by the plugin's JSON report or by --benchmark-json"
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> RunReport:
        file = Path(path)
        try:
            text = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(
                f"{file}: no such report; pass a JSON report written by pytest-llamabench "
                f"or by pytest-benchmark's --benchmark-json"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file}: cannot read the report ({exc}); check the path and permissions") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{file}: not valid JSON ({exc}); was the run interrupted while writing it?") from None
        return cls.from_dict(data, source=str(file))


def _pooled(starts: list[ResultEntry]) -> ResultEntry:
    from pytest_llamabench.metrics import METRICS

    worst = max(starts, key=lambda e: _RANK.get(e.outcome or "passed", 0))
    first = starts[0]
    metrics: dict[str, Summary] = {}
    for name in dict.fromkeys(n for e in starts for n in e.metrics):
        metric = METRICS.get(name)
        if metric is not None and metric.peak:
            metrics[name] = Summary.of([v for e in starts if (v := e.peak(name)) is not None])
        else:
            metrics[name] = Summary.of([v for e in starts if (v := e.median(name)) is not None])
    loads = [e.host_load for e in starts if e.host_load]
    return dataclasses.replace(
        first,
        test=first.test,
        start=None,
        outcome=worst.outcome,
        reason=worst.reason,
        failure=next((e.failure for e in starts if e.failure), None),
        metrics=metrics,
        host_load={"busy": any(d.get("busy") for d in loads),
                   "other_cores": max((d.get("other_cores") or 0.0) for d in loads)} if loads else None,  # fmt: skip
        extra={**first.extra, "starts": len(starts)},
    )


_REPORT_KEYS = ("schema_version", "plugin_version", "started_at", "updated_at", "finished", "interrupted",
                "matrix_files", "fingerprint", "results", "binary", "gate")  # fmt: skip


def _from_llamabench(data: Mapping[str, Any], source: str) -> RunReport:
    version = data["schema_version"]
    if not isinstance(version, int) or isinstance(version, bool) or version > SCHEMA_VERSION:
        raise ConfigError(
            f"{source}: schema_version {version!r} is not supported (this pytest-llamabench reads "
            f"up to {SCHEMA_VERSION}); upgrade pytest-llamabench to compare it"
        )
    entries = data["results"]
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: results: expected a list of result objects")
    return RunReport(
        fingerprint=dict(_mapping(data.get("fingerprint"))),
        results=[ResultEntry.from_dict(e, f"{source}: results[{i}]") for i, e in enumerate(entries)],
        matrix_files=[str(f) for f in data.get("matrix_files") or []],
        started_at=str(data.get("started_at") or ""),
        updated_at=str(data.get("updated_at") or ""),
        finished=data.get("finished") is not False,
        interrupted=_opt_str(data.get("interrupted")),
        plugin_version=str(data.get("plugin_version") or ""),
        binary=dict(data["binary"]) if isinstance(data.get("binary"), Mapping) else None,
        gate=dict(data["gate"]) if isinstance(data.get("gate"), Mapping) else None,
        source=source,
        extra={k: v for k, v in data.items() if k not in _REPORT_KEYS},
    )


def _from_pytest_benchmark(data: Mapping[str, Any], source: str) -> RunReport:
    benchmarks = data["benchmarks"]
    if not isinstance(benchmarks, list):
        raise ConfigError(f"{source}: benchmarks: expected a list of benchmark objects")
    results = [_from_benchmark(b, f"{source}: benchmarks[{i}]") for i, b in enumerate(benchmarks)]
    machine = _mapping(data["machine_info"])
    fingerprint = dict(_mapping(machine.get("llamabench")))
    if not _mapping(fingerprint.get("host")).get("cpu"):
        cpu = machine.get("cpu")
        brand = cpu.get("brand_raw") if isinstance(cpu, Mapping) else None
        if isinstance(brand, str):
            fingerprint["host"] = {**_mapping(fingerprint.get("host")), "cpu": brand}
    return RunReport(fingerprint=fingerprint, results=results, finished=True, source=source, kind="pytest-benchmark")


def _from_benchmark(bench: object, where: str) -> ResultEntry:
    """One pytest-benchmark entry: our entry in ``extra_info``, flat extra_info, or a plain benchmark."""
    if not isinstance(bench, Mapping):
        raise ConfigError(f"{where}: expected an object with name, stats and extra_info")
    extra = bench.get("extra_info") or {}
    if isinstance(extra, Mapping) and isinstance(extra.get("llamabench"), Mapping):
        return ResultEntry.from_dict(extra["llamabench"], f"{where}.extra_info.llamabench")
    if isinstance(extra, Mapping) and "config" in extra and "workload" in extra:
        return ResultEntry.from_dict(_flat_entry(extra), f"{where}.extra_info")
    name = bench.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where}.name: expected the benchmark's test name")
    test, _, params = name.partition("[")
    stats = bench.get("stats")
    if not isinstance(stats, Mapping):
        raise ConfigError(f"{where}.stats: missing; is this a --benchmark-json file?")
    raw = stats.get("data") if stats.get("data") else [stats.get("median")]
    from pytest_llamabench.metrics import TIME_S

    return ResultEntry(name, test, params.rstrip("]") or "-", "passed",
                       metrics={TIME_S.name: Summary.from_json(raw, f"{where}.stats")})  # fmt: skip


def _flat_entry(extra: Mapping[str, Any]) -> dict[str, Any]:
    """extra_info with config/workload/outcome and metrics at the top level -> a result entry."""
    reserved = {"config", "workload", "outcome", "failure", "server", "model", "metrics", "test"}
    metrics = dict(extra["metrics"]) if isinstance(extra.get("metrics"), Mapping) else {}
    metrics.update({k: v for k, v in extra.items() if k not in reserved and _looks_like_metric(v)})
    return {**{k: extra[k] for k in reserved & extra.keys()}, "metrics": metrics}


def _looks_like_metric(value: object) -> bool:
    if isinstance(value, Mapping):
        return "samples" in value or "median" in value
    return isinstance(value, list) and all(is_number(v) for v in value)


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _opt_str(value: object) -> str | None:
    return value if isinstance(value, str) else None


__all__ = ["Failure", "OUTCOMES", "ResultEntry", "RunReport", "SCHEMA_VERSION", "Summary"]
