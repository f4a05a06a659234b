"""pytest-benchmark integration: rounds through ``benchmark.pedantic``, results in ``extra_info``,
host, GPUs and the llama-server build in ``machine_info``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pytest_llamabench.errors import LlamabenchError
from pytest_llamabench.measure.workload import Runner
from pytest_llamabench.metrics import METRICS
from pytest_llamabench.plugin.run import RunState
from pytest_llamabench.results import ResultEntry

ENTRY = "llamabench"  # the key of our result entry in extra_info and machine_info

#: pytest-benchmark options that save, export or compare results: no-ops when it is disabled.
_OUTPUTS = ("save", "autosave", "json", "compare", "compare_fail", "histogram")
_STABLE_GPU_KEYS = ("index", "name", "uuid", "driver", "cuda", "memory_total_mib")


def runner(request: pytest.FixtureRequest) -> Runner | None:
    """``benchmark.pedantic`` as a round runner, or None when pytest-benchmark is absent or off."""
    config = request.config
    if not config.pluginmanager.hasplugin("benchmark"):
        return None
    disabled = config.getoption("benchmark_disable", False) and not config.getoption("benchmark_enable", False)
    if hasattr(config, "workerinput") or disabled:
        # off (xdist disables it): its fixture, requested and then unused, would warn "Benchmark fixture
        # was not used at all" and, on gw0, "Benchmarks are automatically disabled because xdist plugin is
        # active" at exit: errors under filterwarnings = error (an INTERNALERROR at exit)
        return None
    benchmark = request.getfixturevalue("benchmark")
    if getattr(benchmark, "disabled", False):
        return None

    def run(fn: Callable[[], None], rounds: int, warmup: int) -> None:
        benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)

    return run


def fill_extra_info(request: pytest.FixtureRequest, entry: ResultEntry) -> None:
    """Medians at the top level (what pytest-benchmark's tables show), the whole entry under ENTRY."""
    benchmark = request.getfixturevalue("benchmark")
    benchmark.extra_info.update({name: entry.median(name) for name in METRICS if entry.median(name) is not None})
    benchmark.extra_info.update({"config": entry.config, "workload": entry.workload, ENTRY: entry.as_dict()})


def under_xdist_notice(config: pytest.Config) -> str | None:
    """One line when pytest-benchmark output was asked for but xdist disables pytest-benchmark."""
    under_xdist = config.getoption("dist", "no") != "no" and bool(config.getoption("tx", None))
    if not under_xdist or not config.pluginmanager.hasplugin("benchmark"):
        return None
    given = [f"--benchmark-{name.replace('_', '-')}" for name in _OUTPUTS
             if config.getoption(f"benchmark_{name}", None)]  # fmt: skip
    if not given:
        return None
    return (
        f"pytest-benchmark is disabled under xdist (-n), so {', '.join(given)} save or compare nothing; "
        f"the llamabench JSON report and its --llamabench-baseline gate still cover every test"
    )


class BenchmarkHooks:
    """Host, GPUs and the llama-server build in machine_info.

    pytest-benchmark builds machine_info twice: at configure time to compare (--benchmark-compare),
    before any server ran, and at the end to save. Only what is the same at both goes in, or every
    compare warns "machine_info is different" (and pytest-benchmark crashes on that warning when
    its storage is outside the current directory).
    """

    def __init__(self, state: RunState) -> None:
        self.state = state

    def pytest_benchmark_update_machine_info(self, config: pytest.Config, machine_info: dict[str, Any]) -> None:
        fingerprint = self.state.fingerprint()
        fingerprint["gpus"] = [{k: g[k] for k in _STABLE_GPU_KEYS if k in g} for g in fingerprint["gpus"]]
        machine_info[ENTRY] = {**fingerprint, "binary": self._binary_if_found()}

    def _binary_if_found(self) -> dict[str, Any]:
        """The llama-server the tests use, resolved now unless that would need a build."""
        bench = self.state.bench
        if not bench.describe_binary():
            from pytest_llamabench.server.build import resolve_server_bin

            settings = bench.settings
            try:
                resolve_server_bin(settings.server_bin_candidates, spec=settings.build_spec,
                                   build_if_missing=False, log=bench.log,
                                   prefer_cuda=settings.prefer_cuda)  # fmt: skip
                bench.binary()
            except LlamabenchError:
                return {}
        return bench.describe_binary()
