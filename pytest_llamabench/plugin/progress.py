"""Progress in pytest's terminal: a line per finished matrix test (config, workload, outcome,
tok/s, time, ETA) and a line when a server is ready (its load time); on a terminal, also a
transient ``repetition k/R`` status at the end of the current line, erased before pytest writes
the test's result.

- Not a TTY (CI logs): plain lines only, no carriage returns or cursor movement.
- ``-n`` (xdist): workers cannot write to the controller's terminal. The controller prints the
  lines from the workers' test reports (the result entry in ``user_properties`` carries the load
  time and tok/s); the live repetition status exists only without xdist.
- ``-q`` keeps the lines; ``-qq`` or ``--llamabench-progress=off`` turns them off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pytest_llamabench import progress
from pytest_llamabench.config import ServerConfig, Workload
from pytest_llamabench.metrics import GEN_TOK_S
from pytest_llamabench.plugin.reporting import ENTRY, outcome_of


def _size(workload: Workload) -> float:
    return progress.workload_size(workload.prompt_tokens, workload.n_predict, workload.repetitions + workload.warmup,
                                  workload.turns)  # fmt: skip


class ProgressHooks:
    """Registered on the controller (or the only process) when progress is on."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.eta = progress.Eta()
        self._status = ""
        self._announced: set[str] = set()
        self._reports: dict[str, pytest.TestReport] = {}  # the last phase of each running test

    # -- the plan ---------------------------------------------------------------------

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        plan = []
        for item in session.items:
            callspec = getattr(item, "callspec", None)
            server = callspec.params.get("llama_server") if callspec else None
            workload = callspec.params.get("llama_workload") if callspec else None
            if isinstance(server, ServerConfig) and isinstance(workload, Workload):
                plan.append(progress.PlannedTest(item.nodeid, server.instance, workload.name, _size(workload)))
        self.eta.set_plan(plan)

    def plan_from_ids(self, ids: list[str], workers: int, instances: list[str], workloads: list[Workload]) -> None:
        """Under xdist: the controller sees test ids only."""
        self.eta.set_plan(progress.planned_from_ids(ids, instances, {w.name: _size(w) for w in workloads}), workers)

    # -- events -----------------------------------------------------------------------

    def callback(self, event: progress.ProgressEvent) -> None:
        """The measurement's progress callback (in-process runs, so never under xdist)."""
        if isinstance(event, progress.ServerReady):
            self.eta.server_ready(event.instance, event.load_s)
            self._announce(event.instance, event.load_s)
        else:
            left = self.eta.remaining_s()
            self._show_status(event.text() + (f" · ETA {progress.duration(left)}" if left is not None else ""))

    def _announce(self, instance: str, load_s: float | None) -> None:
        if instance in self._announced:
            return
        self._announced.add(instance)
        self._line(f"{instance}: server ready in {load_s:.1f} s" if load_s is not None else f"{instance}: server ready")

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self._clear_status()  # before pytest writes the result
        if report.when in ("setup", "call"):
            self._reports[report.nodeid] = report

    @pytest.hookimpl(trylast=True)
    def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> None:
        """After pytest wrote the test's result (and its [ 42%]): the test's progress line."""
        report = self._reports.pop(nodeid, None)
        if report is not None:
            self.report_finished(report)

    def report_finished(self, report: pytest.TestReport) -> None:
        entries = [v for k, v in report.user_properties if k == ENTRY and isinstance(v, dict)]
        if not entries:
            return
        server = next((e["server"] for e in entries if isinstance(e.get("server"), dict)), None)
        planned = self.eta.plan.get(report.nodeid)
        if server is not None and planned is not None:
            self.eta.server_ready(planned.instance, server.get("load_s"))
            self._announce(planned.instance, server.get("load_s"))
        final = report.when == "call" or (report.when == "setup" and report.outcome != "passed")
        if not final or report.nodeid in self.eta.done:
            return
        self.eta.finished(report.nodeid, report.duration)
        gen = next((e["metrics"][GEN_TOK_S.name].get("median") for e in entries
                    if isinstance(e.get("metrics"), dict) and isinstance(e["metrics"].get(GEN_TOK_S.name), dict)), None)  # fmt: skip
        outcome = outcome_of(report.when, report.outcome, getattr(report, "wasxfail", None), "")[0]
        self._line(progress.finished_line(self.eta, planned, report.nodeid, outcome, report.duration, gen))

    # -- writing ----------------------------------------------------------------------

    def _reporter(self) -> Any:
        return self.config.pluginmanager.get_plugin("terminalreporter")

    def _line(self, text: str) -> None:
        reporter = self._reporter()
        if reporter is None:
            return
        self._clear_status()
        with capture_disabled(self.config):
            writer: Any = getattr(reporter, "_tw", None)
            if getattr(writer, "width_of_current_line", 0):  # after pytest's dots: a line of our own
                reporter.ensure_newline()
                if writer.width_of_current_line:
                    writer.line()
            reporter.write_line(f"[llamabench] {text}")

    def _show_status(self, text: str) -> None:
        """A status after the text of the current line, written past pytest's own bookkeeping so
        that its line width (the [ 42%] column) is untouched; only on a terminal."""
        reporter = self._reporter()
        writer: Any = getattr(reporter, "_tw", None)
        file = getattr(writer, "_file", None)
        if reporter is None or file is None or not getattr(reporter, "isatty", False):
            return
        room = writer.fullwidth - writer.width_of_current_line - 2
        text = f"  {text}"[: max(room, 0)]
        with capture_disabled(self.config):
            self._erase(file)
            if text:
                file.write(text)
                file.flush()
                self._status = text

    def _clear_status(self) -> None:
        if not self._status:
            return
        file = getattr(getattr(self._reporter(), "_tw", None), "_file", None)
        if file is not None:
            with capture_disabled(self.config):
                self._erase(file)

    def _erase(self, file: Any) -> None:
        if self._status:
            file.write(f"\x1b[{len(self._status)}D\x1b[K")  # back over the status, erase to the end of the line
            file.flush()
            self._status = ""


class ProgressXdistHooks:
    """The plan on an xdist controller, which sees each worker's collected test ids only."""

    def __init__(self, hooks: ProgressHooks, workers: int, instances: Callable[[], list[str]],
                 workloads: Callable[[], list[Workload]]) -> None:  # fmt: skip
        self.hooks = hooks
        self.workers = workers  # known at configure time (-n): not counted from collection events
        self.instances = instances
        self.workloads = workloads

    def pytest_xdist_node_collection_finished(self, node: Any, ids: list[str]) -> None:
        if not self.hooks.eta.plan:  # every worker collects the same ids: plan once
            self.hooks.plan_from_ids(ids, self.workers, self.instances(), self.workloads())


class capture_disabled:  # noqa: N801 - used like a function
    """pytest's output capture suspended (as live logging does), so a line reaches the terminal
    from inside a test or fixture."""

    def __init__(self, config: pytest.Config) -> None:
        self.capman = config.pluginmanager.get_plugin("capturemanager")
        self.inner: Any = None

    def __enter__(self) -> None:
        if self.capman is not None:
            self.inner = self.capman.global_and_fixture_disabled()
            self.inner.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self.inner is not None:
            self.inner.__exit__(*exc)


__all__ = ["ProgressHooks", "ProgressXdistHooks"]
