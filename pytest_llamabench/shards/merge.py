"""Join the reports of several hosts (shards) into one ``RunReport``.

Reports are joined only when they are comparable: the same GPU models, llama.cpp builds,
model files (sha256 by name) and CPU model, unless ``allow_mixed`` (then the differences
are recorded under ``fingerprint.mixed``). A test measured in two reports is refused (two
hosts ran the same config: different ``--llamabench-shard`` splits?), and so is a set of
shard reports with a shard missing or given twice. Each host's own facts are kept in
``fingerprint.hosts``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pytest_llamabench.errors import ConfigError
from pytest_llamabench.results import RunReport, now

#: Top-level report keys that describe one run and are recomputed for the merged one.
_PER_RUN_EXTRA = ("shard", "winner", "merged")


def comparable_facts(report: RunReport) -> dict[str, str]:
    """What must be equal across merged reports, as text: GPU models, builds, CPU, models."""
    fp = report.fingerprint
    listed_gpus = fp.get("gpus")
    gpus: list[Any] = listed_gpus if isinstance(listed_gpus, list) else []
    listed = fp.get("llama_cpp_builds")
    builds = (listed if isinstance(listed, list) else []) or sorted({r.build for r in report.results if r.build})
    facts = {
        "GPU models": ", ".join(sorted({str(g.get("name", "?")) for g in gpus if isinstance(g, Mapping)})) or "none",
        "llama.cpp builds": ", ".join(sorted(map(str, builds))) or "unknown",
        "CPU": str(_mapping(fp.get("host")).get("cpu") or "unknown"),
    }
    for name, model in sorted(_mapping(fp.get("models")).items()):
        if isinstance(model, Mapping) and model.get("sha256"):
            facts[f"model {name}"] = str(model["sha256"])
    return facts


def mixed_facts(reports: Sequence[RunReport]) -> dict[str, dict[str, str]]:
    """fact -> {report: value} for every fact that differs (unknown builds do not count)."""
    facts = [comparable_facts(r) for r in reports]
    differing: dict[str, dict[str, str]] = {}
    for key in dict.fromkeys(k for f in facts for k in f):
        values = {r.source: f[key] for r, f in zip(reports, facts) if key in f and f[key] != "unknown"}
        if len(set(values.values())) > 1:
            differing[key] = values
    return differing


def merge_reports(reports: Sequence[RunReport], *, allow_mixed: bool = False) -> RunReport:
    """One report of every result of ``reports``; see the module for what is refused."""
    if not reports:
        raise ConfigError("merge: no report given; pass the JSON reports of every shard")
    for report in reports:
        if report.kind != "llamabench":
            raise ConfigError(f"{report.source}: a pytest-benchmark JSON cannot be merged; pass the reports "
                              "pytest-llamabench wrote (--llamabench-json)")  # fmt: skip
    mixed = mixed_facts(reports)
    if mixed and not allow_mixed:
        what = " | ".join(f"{fact}: " + "; ".join(f"{v} ({s})" for s, v in by.items()) for fact, by in mixed.items())
        raise ConfigError(
            f"merge: the reports were measured on different setups ({what}): their numbers are not one matrix; "
            "merge reports of identical hosts and builds, or pass --allow-mixed to merge anyway (recorded in "
            "the report's fingerprint.mixed)"
        )
    _check_shards(reports)
    seen: dict[str, str] = {}
    for report in reports:
        for entry in report.results:
            if entry.test in seen:
                raise ConfigError(
                    f"merge: {entry.test} is in both {seen[entry.test]} and {report.source}; each config must be "
                    "measured on one host (give every host the same --llamabench-shard=i/N split and selection)"
                )
            seen[entry.test] = report.source
    first = reports[0]
    fingerprint = {k: v for k, v in first.fingerprint.items() if k not in ("gpus_at_end",)}
    fingerprint["llama_cpp_builds"] = sorted({b for r in reports for b in r.fingerprint.get("llama_cpp_builds") or []})
    fingerprint["models"] = {k: v for r in reports for k, v in _mapping(r.fingerprint.get("models")).items()}
    fingerprint["hosts"] = [_host(r) for r in reports]
    if mixed:
        fingerprint["mixed"] = mixed
    interrupted = [f"{r.source}: {r.interrupted}" for r in reports if r.interrupted]
    extra = {k: v for k, v in first.extra.items() if k not in _PER_RUN_EXTRA}
    extra["merged"] = {"reports": [r.source for r in reports], "allow_mixed": bool(mixed)}
    return RunReport(
        fingerprint=fingerprint,
        results=[entry for r in reports for entry in r.results],
        matrix_files=list(dict.fromkeys(f for r in reports for f in r.matrix_files)),
        started_at=min((r.started_at for r in reports if r.started_at), default=now()),
        updated_at=now(),
        finished=all(r.finished for r in reports),
        interrupted="; ".join(interrupted) or None,
        plugin_version=first.plugin_version,
        binary=first.binary,
        source=" + ".join(r.source for r in reports),
        extra=extra,
    )


def _check_shards(reports: Sequence[RunReport]) -> None:
    shards = [(r.source, _mapping(r.extra.get("shard"))) for r in reports]
    given = [(s, d) for s, d in shards if d]
    if not given:
        return
    if len(given) != len(reports):
        plain = ", ".join(s for s, d in shards if not d)
        raise ConfigError(f"merge: {plain} ran without --llamabench-shard, the others with it; merge the shards "
                          "of one split")  # fmt: skip
    counts = {int(d.get("count", 0)) for _, d in given}
    if len(counts) != 1:
        splits = ", ".join(f"{s}: shard {d.get('index')}/{d.get('count')}" for s, d in given)
        raise ConfigError(f"merge: the reports come from different splits ({splits}); merge the shards of one split")
    count = counts.pop()
    by_index: dict[int, str] = {}
    for source, d in given:
        index = int(d.get("index", 0))
        if index in by_index:
            raise ConfigError(f"merge: shard {index}/{count} is given twice ({by_index[index]} and {source})")
        by_index[index] = source
    missing = [f"{i}/{count}" for i in range(1, count + 1) if i not in by_index]
    if missing:
        raise ConfigError(f"merge: shard {', '.join(missing)} is missing; pass the reports of all {count} shards "
                          "(a failed host's report too: it holds what it measured before failing)")  # fmt: skip


def _host(report: RunReport) -> dict[str, Any]:
    fp = report.fingerprint
    gpus = fp.get("gpus") if isinstance(fp.get("gpus"), list) else []
    return {
        "report": report.source,
        "shard": dict(_mapping(report.extra.get("shard"))) or None,
        "host": dict(_mapping(fp.get("host"))),
        "gpus": gpus,
        "started_at": report.started_at,
        "finished": report.finished,
        "results": len(report.results),
    }


def _mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


__all__ = ["comparable_facts", "merge_reports", "mixed_facts"]
