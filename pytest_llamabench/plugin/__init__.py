"""pytest wiring: options, markers, parametrization, fixtures, hooks. Logic lives elsewhere."""

from __future__ import annotations

import signal
from collections.abc import Callable, Generator, Iterator
from typing import Any, cast

import pytest

from pytest_llamabench.bench import RunningServer, measure
from pytest_llamabench.config import ServerConfig, Thresholds, Workload
from pytest_llamabench.errors import LlamabenchError, ServerOutOfMemory, ThresholdNotMet
from pytest_llamabench.measure.thresholds import check_thresholds
from pytest_llamabench.plugin import benchmark, options, workers
from pytest_llamabench.plugin.progress import ProgressHooks, ProgressXdistHooks
from pytest_llamabench.plugin.reporting import ENTRY, ReportHooks, phase_entry
from pytest_llamabench.plugin.quality import QUALITY, NoServer, QualityRuns, is_quality
from pytest_llamabench.plugin.run import STATE, RunState
from pytest_llamabench.plugin.search import llama_search
from pytest_llamabench.plugin.search import parametrize as parametrize_searches
from pytest_llamabench.plugin.xdist import XdistHooks
from pytest_llamabench.results import ResultEntry



def pytest_addoption(parser: pytest.Parser) -> None:
    options.add_options(parser)


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
        state = RunState.from_pytest(config)
    except LlamabenchError as exc:
        raise pytest.UsageError(str(exc)) from None
    config.stash[STATE] = state
    config.stash[QUALITY] = QualityRuns(state)
    if state.is_worker:  # two workers can run one config (--dist load; loadgroup on pytest 9.2, see
        # pytest-xdist#1386): each needs its own logs, or a server is found at the other's URL
        state.bench.settings.log_dir /= str(config.workerinput["workerid"])  # type: ignore[attr-defined]
    else:
        config.pluginmanager.register(ReportHooks(state), "llamabench-report")
        _register_progress(config, state)
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(XdistHooks(state), "llamabench-xdist")
    if config.pluginmanager.hasplugin("benchmark"):
        config.pluginmanager.register(benchmark.BenchmarkHooks(state), "llamabench-benchmark")


@pytest.hookimpl(optionalhook=True, tryfirst=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` with GPU configs selected: one xdist worker per GPU (plugin/workers.py)."""
    import os

    if os.environ.get("PYTEST_XDIST_AUTO_NUM_WORKERS"):
        return None  # the user's own choice, read by xdist
    try:
        state = RunState.from_pytest(config)
        return None if state.matrix is None else workers.auto_num_workers(state.selected_configs())
    except LlamabenchError:
        return None  # reported by pytest_configure


def _register_progress(config: pytest.Config, state: RunState) -> None:
    """Progress lines on the controller (plugin/progress.py); live repetition status without xdist."""
    if state.matrix is None or options.value(config, "progress")[0] == "off" or config.get_verbosity() <= -2:
        return
    count = workers.xdist_workers(config)
    distributed = count > 0
    hooks = ProgressHooks(config)
    config.pluginmanager.register(hooks, "llamabench-progress")
    if config.pluginmanager.hasplugin("xdist"):
        config.pluginmanager.register(ProgressXdistHooks(hooks, max(count, 1), lambda: [c.instance for c in state.server_starts()],
                                                         state.selected_workloads), "llamabench-progress-xdist")  # fmt: skip
    if not distributed:
        state.bench.progress = hooks.callback


def pytest_sessionstart(session: pytest.Session) -> None:
    state = session.config.stash[STATE]
    if state.is_controller:
        notice = benchmark.under_xdist_notice(session.config)
        shares = workers.describe_workers(session.config, state.selected_configs()) if state.matrix else None
        for message in [*([notice] if notice else []), *([shares] if shares else []), *state.start()]:
            session.config.get_terminal_writer().line(f"llamabench: {message}")
        signal.signal(signal.SIGTERM, _sigterm_as_interrupt)


def _sigterm_as_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # so fixtures and reports finish as on Ctrl-C


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    state = metafunc.config.stash[STATE]
    try:
        if "llama_server" in metafunc.fixturenames:
            params = [pytest.param(c, id=c.instance, marks=_marks(c)) for c in state.server_starts()]
            metafunc.parametrize("llama_server", params, indirect=True, scope="session")
        if "llama_workload" in metafunc.fixturenames:
            metafunc.parametrize("llama_workload", [pytest.param(w, id=w.name) for w in state.selected_workloads()])
        if "llama_search" in metafunc.fixturenames:  # one item per search config (plugin/search.py)
            parametrize_searches(metafunc, state.search_configs())
    except LlamabenchError as exc:
        pytest.fail(str(exc), pytrace=False)


def _marks(config: ServerConfig) -> list[pytest.MarkDecorator]:
    marks = [pytest.mark.xdist_group(config.instance)]  # --dist loadgroup: one server per config start
    if config.gpu:
        marks.append(pytest.mark.gpu)
    marks += [getattr(pytest.mark, name) for name in config.marks]
    if config.expect == "oom":
        marks.append(_expected_oom(f'expect = "oom" in {config.source}'))
    return marks


def _expected_oom(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(raises=ServerOutOfMemory, strict=True, reason=f"expected OOM ({reason})")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _deselect_inapplicable(config, items)
    config.stash[QUALITY].plan(items)  # quality workloads run before their config's server
    config.stash[STATE].expected_tests = sum("llama_server" in getattr(i, "fixturenames", ()) for i in items)
    for item in items:
        _expect_not_recommended(item)
        if item.get_closest_marker("llamabench_oom") and not item.get_closest_marker("xfail"):
            item.add_marker(_expected_oom(f"@pytest.mark.llamabench_oom on {item.nodeid}"))


def _expect_not_recommended(item: pytest.Item) -> None:
    """``expect = "not-recommended"``: the config's quality workloads must fail their quality
    thresholds (a strict xfail: a quant that unexpectedly passes is XPASS); its speed workloads run
    as usual and the winner rule leaves it out."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    server, workload = params.get("llama_server"), params.get("llama_workload")
    if isinstance(server, ServerConfig) and is_quality(workload) and server.expect == "not-recommended":
        item.add_marker(pytest.mark.xfail(raises=ThresholdNotMet, strict=True,
                                          reason=f'expected NOT RECOMMENDED (expect = "not-recommended" in {server.source})'))


def _deselect_inapplicable(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Config x workload pairs that do not apply (``Workload.applies_to``: a workload's ``configs``,
    a vision workload on a model without mmproj) are deselected, not run."""
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        server, workload = params.get("llama_server"), params.get("llama_workload")
        applies = not isinstance(server, ServerConfig) or not isinstance(workload, Workload) or workload.applies_to(server)
        if "llama_search" in getattr(item, "fixturenames", ()) and not isinstance(params.get("llama_search"), ServerConfig):
            applies = False  # the matrix has no search config: test_search has nothing to run (plugin/search.py)
        (keep if applies else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("gpu"):
        state = item.config.stash[STATE]
        status = state.gpu_status()
        if not status.available:
            message = f"no usable NVIDIA GPU: {status.reason} ({status.fix})"
            if state.require_gpu:
                pytest.fail(f"{message}; --llamabench-require-gpu is set", pytrace=False)
            pytest.skip(message)


# -- fixtures ------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_server(request: pytest.FixtureRequest) -> Iterator[RunningServer | NoServer]:
    """One llama-server per config, shared by every test of that config (indirect param)."""
    config = getattr(request, "param", None)
    if not isinstance(config, ServerConfig):
        raise pytest.UsageError("llama_server is parametrized by the llamabench plugin; load a matrix")
    quality = request.config.stash[QUALITY]
    quality.run_before_server(config)  # llama-perplexity first: the previous config's server is gone, this one not up
    if not quality.needs_server(config):
        yield NoServer(config)
        return
    with request.config.stash[STATE].bench.launch(config) as running:
        yield running


@pytest.fixture
def llama_workload(request: pytest.FixtureRequest) -> Workload:
    """The workload of this test (parametrized from the matrix)."""
    workload = getattr(request, "param", None)
    if not isinstance(workload, Workload):
        raise pytest.UsageError("llama_workload is parametrized by the llamabench plugin; load a matrix")
    return workload


@pytest.fixture
def llamabench(request: pytest.FixtureRequest) -> Callable[[RunningServer | NoServer, Workload], ResultEntry]:
    """``llamabench(llama_server, llama_workload)``: measure, record, check thresholds."""
    item = request.node
    state = request.config.stash[STATE]

    def run(server: RunningServer | NoServer, workload: Workload) -> ResultEntry:
        runner = None
        if is_quality(workload):  # measured by llama-perplexity before the server started (plugin/quality.py)
            entry = request.config.stash[QUALITY].result(server.config, workload)
        else:
            runner = benchmark.runner(request)
            entry = measure(cast(RunningServer, server), workload, runner=runner, settings=state.measuring,
                            progress=state.bench.progress)  # fmt: skip
        thresholds = server.config.thresholds_for(workload.name, workload.load.group if workload.load else None)
        for mark in item.iter_markers("llamabench_thresholds"):
            thresholds = thresholds.merged(_marker_thresholds(mark, item.nodeid))
        entry.thresholds = {**thresholds.limits, "source": thresholds.source} if thresholds.limits else None
        entry.binary = state.bench.describe_binary()
        item.user_properties.append((ENTRY, entry.as_dict()))
        if runner is not None:
            benchmark.fill_extra_info(request, entry)
        check_thresholds(entry, thresholds)
        return entry

    return run


def _marker_thresholds(mark: pytest.Mark, nodeid: str) -> Thresholds:
    try:
        return Thresholds.of(f"@pytest.mark.llamabench_thresholds on {nodeid}", **mark.kwargs)
    except LlamabenchError as exc:
        pytest.fail(str(exc), pytrace=False)


# -- reports -------------------------------------------------------------------


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: sees xfail's verdict
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, Any]:
    report = yield
    phase = phase_entry(item, call, report, item.config.stash[STATE].log_tail)
    if phase is not None:
        report.user_properties.append((ENTRY, phase.as_dict()))
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    state = session.config.stash[STATE]
    interrupted = exitstatus == pytest.ExitCode.INTERRUPTED or session.shouldstop
    why = (str(session.shouldstop) if isinstance(session.shouldstop, str) else "Ctrl-C or SIGTERM") if interrupted else None
    if state.is_controller and state.finish(why) and session.exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED  # the regression gate failed


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    for title, text in config.stash[STATE].summary_sections():
        terminalreporter.write_sep("=", title)
        terminalreporter.write_line(text)


__all__ = ["llama_search", "llama_server", "llama_workload", "llamabench"]
