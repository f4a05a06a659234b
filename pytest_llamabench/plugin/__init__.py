"""pytest wiring: options, markers, parametrization, fixtures, hooks. Logic lives elsewhere."""

from __future__ import annotations

import signal
from collections.abc import Callable, Generator, Iterator
from typing import Any

import pytest

from pytest_llamabench.plugin import options as opts
from pytest_llamabench.config import ServerConfig, Workload
from pytest_llamabench.errors import LlamabenchError, ServerOutOfMemory
from pytest_llamabench.results import outcome_of
from pytest_llamabench.bench import RunningServer, check_thresholds, measure
from pytest_llamabench.plugin.run import Session

SESSION = pytest.StashKey[Session]()
ENTRY = "llamabench"  # user_properties key: a builtin-typed result entry


def pytest_addoption(parser: pytest.Parser) -> None:
    opts.add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    for line in (
        "gpu: needs a usable NVIDIA GPU (skipped without one; --llamabench-require-gpu fails instead)",
        "llamabench_oom: an out-of-memory of this test's server is expected (strict xfail)",
        "llamabench_thresholds(**limits): min_gen_tok_s, min_prompt_tok_s, max_ttft_ms, max_rss_mib, max_vram_mib",
    ):
        config.addinivalue_line("markers", line)
    if not config.pluginmanager.hasplugin("xdist"):
        config.addinivalue_line("markers", "xdist_group(name): keeps a config's tests on one xdist worker")
    try:
        session = Session.from_pytest(config)
    except LlamabenchError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[SESSION] = session
    if session.is_worker:  # two workers can run one config (--dist load; loadgroup on pytest 9.2, see
        # pytest-xdist#1386): each needs its own logs, or a server is found at the other's URL
        session.bench.settings.log_dir /= str(config.workerinput["workerid"])  # type: ignore[attr-defined]
    if not session.is_worker:
        config.pluginmanager.register(ReportHooks(session), "llamabench-report")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(), "llamabench-xdist")
    if config.pluginmanager.hasplugin("benchmark"):
        config.pluginmanager.register(BenchmarkHooks(), "llamabench-benchmark")


def pytest_sessionstart(session: pytest.Session) -> None:
    bench = session.config.stash[SESSION]
    if bench.is_controller:
        notice = _benchmark_under_xdist_notice(session.config)
        for message in [*([notice] if notice else []), *bench.start()]:
            session.config.get_terminal_writer().line(f"llamabench: {message}")
    if not bench.is_worker:
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


#: pytest-benchmark options that save, export or compare results: no-ops when it is disabled.
_BENCHMARK_OUTPUTS = ("save", "autosave", "json", "compare", "compare_fail", "histogram")


def _benchmark_under_xdist_notice(config: pytest.Config) -> str | None:
    """One line when pytest-benchmark output was asked for but xdist disables pytest-benchmark."""
    under_xdist = config.getoption("dist", "no") != "no" and bool(config.getoption("tx", None))
    if not under_xdist or not config.pluginmanager.hasplugin("benchmark"):
        return None
    given = [f"--benchmark-{name.replace('_', '-')}" for name in _BENCHMARK_OUTPUTS
             if config.getoption(f"benchmark_{name}", None)]  # fmt: skip
    if not given:
        return None
    return (
        f"pytest-benchmark is disabled under xdist (-n), so {', '.join(given)} save or compare nothing; "
        f"the llamabench JSON report and its --llamabench-baseline gate still cover every test"
    )


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so fixtures and reports finish as on Ctrl-C


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    session = metafunc.config.stash[SESSION]
    if "llama_server" in metafunc.fixturenames:
        try:
            configs = session.selected_configs()
        except LlamabenchError as exc:
            pytest.fail(str(exc), pytrace=False)
        metafunc.parametrize(
            "llama_server", [pytest.param(c, id=c.name, marks=_marks(c)) for c in configs],
            indirect=True, scope="session",
        )  # fmt: skip
    if "llama_workload" in metafunc.fixturenames:
        try:
            workloads = session.selected_workloads()
        except LlamabenchError as exc:
            pytest.fail(str(exc), pytrace=False)
        metafunc.parametrize("llama_workload", [pytest.param(w, id=w.name) for w in workloads])


def _marks(config: ServerConfig) -> list[pytest.MarkDecorator]:
    marks = [pytest.mark.xdist_group(config.name)]  # --dist loadgroup: one server per config
    if config.gpu:
        marks.append(pytest.mark.gpu)
    marks += [getattr(pytest.mark, name) for name in config.marks]
    if config.expect == "oom":
        marks.append(_expected_oom(f'expect = "oom" in {config.source}'))
    return marks


def _expected_oom(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(raises=ServerOutOfMemory, strict=True, reason=f"expected OOM ({reason})")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("llamabench_oom") and not item.get_closest_marker("xfail"):
            item.add_marker(_expected_oom(f"@pytest.mark.llamabench_oom on {item.nodeid}"))


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu"):
        status = item.config.stash[SESSION].gpu_status()
        if not status.available:
            message = f"no usable NVIDIA GPU: {status.reason} ({status.fix})"
            if item.config.stash[SESSION].require_gpu:
                pytest.fail(f"{message}; --llamabench-require-gpu is set", pytrace=False)
            pytest.skip(message)


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_server(request: pytest.FixtureRequest) -> Iterator[RunningServer]:
    """One llama-server per config, shared by every test of that config (indirect param)."""
    config = getattr(request, "param", None)
    if not isinstance(config, ServerConfig):
        raise pytest.UsageError("llama_server is parametrized by the llamabench plugin; load a matrix")
    session = request.config.stash[SESSION]
    with session.bench.launch(config) as running:
        yield running


@pytest.fixture
def llama_workload(request: pytest.FixtureRequest) -> Workload:
    """The workload of this test (parametrized from the matrix)."""
    workload = getattr(request, "param", None)
    if not isinstance(workload, Workload):
        raise pytest.UsageError("llama_workload is parametrized by the llamabench plugin; load a matrix")
    return workload


@pytest.fixture
def llamabench(request: pytest.FixtureRequest) -> Callable[[RunningServer, Workload], Any]:
    """``llamabench(llama_server, llama_workload)``: measure, record, check thresholds."""
    item = request.node
    session = request.config.stash[SESSION]

    def run(server: RunningServer, workload: Workload) -> Any:
        runner = _benchmark_runner(request)
        measurement, entry = measure(server, workload, runner=runner)
        thresholds = server.config.thresholds_for(workload.name)
        for mark in item.iter_markers("llamabench_thresholds"):
            thresholds = thresholds.merged(type(thresholds)(**mark.kwargs, source=f"marker on {item.nodeid}"))
        entry["thresholds"] = {**dict(thresholds.items()), "source": thresholds.source} if thresholds.items() else None
        entry["binary"] = session.bench.describe_binary()
        item.user_properties.append((ENTRY, entry))
        if runner is not None:
            _fill_benchmark_extra_info(request, entry)
        check_thresholds(measurement, thresholds)
        return measurement

    return run


def _benchmark_runner(request: pytest.FixtureRequest) -> Any:
    if not request.config.pluginmanager.hasplugin("benchmark"):
        return None
    benchmark = request.getfixturevalue("benchmark")
    if getattr(benchmark, "disabled", False):
        return None

    def runner(fn: Callable[[], None], rounds: int, warmup: int) -> None:
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)

    return runner


def _fill_benchmark_extra_info(request: pytest.FixtureRequest, entry: dict[str, Any]) -> None:
    benchmark = request.getfixturevalue("benchmark")
    metrics = entry.get("metrics", {})
    benchmark.extra_info.update({k: v["median"] for k, v in metrics.items() if "median" in v})
    benchmark.extra_info.update({"config": entry.get("config"), "workload": entry.get("workload"), ENTRY: entry})


# -- reports -------------------------------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: sees xfail's verdict
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    callspec = getattr(item, "callspec", None)
    config = callspec.params.get("llama_server") if callspec else None
    workload = callspec.params.get("llama_workload") if callspec else None
    if not isinstance(config, ServerConfig):
        return report
    base: dict[str, Any] = {"config": config.name, "workload": workload.name if isinstance(workload, Workload) else None,
            "description": config.description, "expect": config.expect}  # fmt: skip
    exc = call.excinfo.value if call.excinfo is not None else None
    if isinstance(exc, LlamabenchError):
        base["failure"] = _failure(exc)
        base.update(exc.context)
        if hasattr(report, "wasxfail"):
            report.wasxfail = f"{report.wasxfail}: {exc.summary}"
        elif report.failed:  # one clear line instead of a traceback through the plugin
            report.longrepr = f"{exc.kind}: {exc.message}"
    if report.failed or hasattr(report, "wasxfail"):
        tail = (exc.log_tail if isinstance(exc, LlamabenchError) else "") or item.config.stash[SESSION].log_tail(config.name)
        if tail:
            report.sections.append((f"llama-server log ({config.name})", tail))
    report.user_properties.append((ENTRY, base))
    return report


def _failure(exc: LlamabenchError) -> dict[str, Any]:
    detail = {}
    if isinstance(exc, ServerOutOfMemory):
        detail = {"device": exc.device, "requested_mib": exc.requested_mib, "buffer": exc.buffer}
    return {"kind": exc.kind, "message": exc.message, "detail": detail}


class ReportHooks:
    """Feeds every test report (from workers too) into the JSON report; controller only."""

    def __init__(self, session: Session) -> None:
        self.session = session

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        phase: dict[str, Any] = {}
        for key, value in report.user_properties:
            if key == ENTRY and isinstance(value, dict):
                phase.update(value)
        if not phase or self.session.report is None:
            return
        if report.when == "call" or report.outcome != "passed":
            outcome, reason = outcome_of(report.when, report.outcome, getattr(report, "wasxfail", None),
                                         str(report.longrepr or ""))  # fmt: skip
            phase.update(outcome=outcome, reason=reason)
        if report.when == "call":
            phase["duration_s"] = round(report.duration, 3)
        if self.session.report.update(report.nodeid, phase) is not None:
            self.session.report.write()  # only once the test has an outcome


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    bench = session.config.stash[SESSION]
    if bench.is_worker:
        return
    if bench.finish() and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # the regression gate failed


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    bench = config.stash[SESSION]
    for title, text in bench.summary_sections():
        terminalreporter.write_sep("=", title)
        terminalreporter.write_line(text)


class XdistHooks:
    """Hooks that exist only with pytest-xdist (pytest-randomly's pattern)."""

    def pytest_configure_node(self, node: Any) -> None:
        session = node.config.stash[SESSION]
        node.workerinput["llamabench_run_id"] = session.bench.settings.run_id


class BenchmarkHooks:
    """pytest-benchmark integration: host, GPUs and the llama-server build in machine_info.

    pytest-benchmark builds machine_info twice: at configure time to compare (--benchmark-compare),
    before any server ran, and at the end to save. Only what is the same at both goes in, or every
    compare warns "machine_info is different" (and pytest-benchmark crashes on that warning when
    its storage is outside the current directory).
    """

    def pytest_benchmark_update_machine_info(self, config: pytest.Config, machine_info: dict[str, Any]) -> None:
        session = config.stash[SESSION]
        fingerprint = session.fingerprint()
        fingerprint["gpus"] = [{k: g[k] for k in _STABLE_GPU_KEYS if k in g} for g in _gpus_now(session)]
        machine_info[ENTRY] = {**fingerprint, "binary": _binary_if_found(session)}


_STABLE_GPU_KEYS = ("index", "name", "uuid", "driver", "cuda", "memory_total_mib")


def _gpus_now(session: Session) -> list[dict[str, Any]]:
    if not session.gpu_status().available:
        return []
    from pytest_llamabench.hardware.gpu import snapshot_gpus

    try:
        return [g.as_dict() for g in snapshot_gpus()]
    except LlamabenchError:  # a lost GPU: the tests will say so
        return []


def _binary_if_found(session: Session) -> dict[str, Any]:
    """The llama-server the tests use, resolved now unless that would need a build."""
    bench = session.bench
    if not bench.describe_binary():
        from pytest_llamabench.server.build import resolve_server_bin

        settings = bench.settings
        try:
            resolve_server_bin(settings.server_bin_candidates, spec=settings.build_spec,
                               build_if_missing=False, log=bench.log)  # fmt: skip
            bench.binary()
        except LlamabenchError:
            return {}
    return bench.describe_binary()


__all__ = ["llama_server", "llama_workload", "llamabench"]
