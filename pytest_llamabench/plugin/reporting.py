"""From pytest's test reports to result entries: one phase at a time, merged by the controller."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import pytest

from pytest_llamabench.config import ServerConfig, Workload
from pytest_llamabench.errors import LlamabenchError
from pytest_llamabench.plugin.run import RunState
from pytest_llamabench.results import Failure, ResultEntry

ENTRY = "llamabench"  # user_properties key: a builtin-typed result entry (workers send these)


def phase_entry(item: pytest.Item, call: pytest.CallInfo[None], report: pytest.TestReport,
                log_tail: Callable[[str], str]) -> ResultEntry | None:  # fmt: skip
    """What this phase says about a matrix test; also gives a failing report one clear line
    and the server log tail."""
    callspec = getattr(item, "callspec", None)
    config = callspec.params.get("llama_server") if callspec else None
    workload = callspec.params.get("llama_workload") if callspec else None
    if not isinstance(config, ServerConfig):
        return None
    entry = ResultEntry(item.nodeid, config.name, workload.name if isinstance(workload, Workload) else None,
                        start=config.start if config.restarts > 1 else None, description=config.description,
                        expect=config.expect)  # fmt: skip
    if isinstance(workload, Workload) and workload.load is not None:  # a failed level stays on its load curve
        entry.workload_spec = dataclasses.asdict(workload)
    exc = call.excinfo.value if call.excinfo is not None else None
    if isinstance(exc, LlamabenchError):
        entry.failure = Failure.from_exception(exc)
        entry.server = _dict_or_none(exc.context.get("server"))
        entry.model = _dict_or_none(exc.context.get("model"))
        if memory := _dict_or_none(exc.context.get("memory")):
            entry.extra["memory"] = memory  # the plan beside what the failed launch reported (planning.py)
        if hasattr(report, "wasxfail"):
            report.wasxfail = f"{report.wasxfail}: {exc.summary}"
        elif report.failed:  # one clear line instead of a traceback through the plugin
            report.longrepr = f"{exc.kind}: {exc.message}"
    if report.failed or hasattr(report, "wasxfail"):
        tail = (exc.log_tail if isinstance(exc, LlamabenchError) else "") or log_tail(config.instance)
        if tail:
            report.sections.append((f"llama-server log ({config.name})", tail))
    return entry


def _dict_or_none(value: object) -> dict[str, Any] | None:
    return dict(value) if isinstance(value, dict) else None


def outcome_of(when: str, outcome: str, wasxfail: str | None, longrepr: str) -> tuple[str, str | None]:
    """Map one pytest report phase to (outcome, reason)."""
    if wasxfail is not None:
        return ("xfailed", wasxfail) if outcome == "skipped" else ("xpassed", wasxfail)
    if outcome == "failed":
        return ("error" if when != "call" else "failed"), _first_line(longrepr)
    if outcome == "skipped":
        return "skipped", _skip_reason(longrepr)
    return "passed", None


def _skip_reason(longrepr: str) -> str:
    m = re.search(r"Skipped: (.*?)['\"]?\)?$", longrepr)
    return m.group(1) if m else longrepr[-300:]


def _first_line(longrepr: str) -> str:
    lines = [line for line in longrepr.splitlines() if line.startswith("E ")]
    return (lines[0][1:].strip() if lines else longrepr.strip().splitlines()[-1] if longrepr.strip() else "")[:500]


class ReportHooks:
    """Feeds every test report (from workers too) into the run's report; controller only."""

    def __init__(self, state: RunState) -> None:
        self.state = state

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        values = [v for k, v in report.user_properties if k == ENTRY and isinstance(v, dict)]
        if not values or self.state.report is None:
            return
        phase = ResultEntry(report.nodeid)
        for value in values:  # the fixture's measurement, then this phase's facts
            phase.merge(ResultEntry.from_dict(value, strict=False))
        if report.when == "call" or report.outcome != "passed":
            phase.outcome, phase.reason = outcome_of(report.when, report.outcome, getattr(report, "wasxfail", None),
                                                     str(report.longrepr or ""))  # fmt: skip
        if report.when == "call":
            phase.duration_s = round(report.duration, 3)
        phase.test = report.nodeid
        self.state.record(phase)
