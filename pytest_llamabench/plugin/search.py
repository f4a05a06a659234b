"""pytest wiring of the auto-fit search: one test item per search config (``test_search[C7-search]``).

The search itself is ``pytest_llamabench.search`` (pytest-free); this module parametrizes the
``llama_search`` fixture with the matrix's search configs and records the search's result
(every probe, the curve, the choice) as one report entry.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from pytest_llamabench.bench import MeasureSettings, measure
from pytest_llamabench.config import ServerConfig
from pytest_llamabench.errors import LlamabenchError
from pytest_llamabench.results import ResultEntry
from pytest_llamabench.search import Search, SearchResult

ENTRY = "llamabench"  # the same user_properties key as plugin.reporting.ENTRY


def parametrize(metafunc: pytest.Metafunc, configs: list[ServerConfig]) -> None:
    """``llama_search`` over the selected search configs, id = config name."""
    params = []
    for config in configs:
        marks = [pytest.mark.xdist_group(config.name)] + ([pytest.mark.gpu] if config.gpu else [])
        params.append(pytest.param(config, id=config.name, marks=marks))
    metafunc.parametrize("llama_search", params, indirect=True)


def run_search(config: ServerConfig, state: Any, log: Callable[[str], None]) -> SearchResult:
    """Run one search with the session's bench, budget and first selected workload."""
    from pytest_llamabench.model.tensors import ModelTensors
    from pytest_llamabench.planning import LaunchPlan, gpu_memory_of

    bench = state.bench
    workload = state.selected_workloads()[0]
    budget = config.budget(bench.settings.vram_budget)
    total, index = gpu_memory_of(bench.settings.devices) if config.gpu else (None, None)
    settings: MeasureSettings = state.measuring

    def planner(probe: ServerConfig) -> Any:
        plan = LaunchPlan.for_config(probe, budget=budget, gpu_memory=total, gpu_index=index)
        return plan.plan if plan is not None else None

    try:
        n_layer: int | None = ModelTensors.from_gguf(config.model.resolve()).n_layer
    except (LlamabenchError, OSError):
        n_layer = None
    where = (f"VRAM budget {budget / 2**30:g} GiB" if budget else "the GPU's memory" if config.gpu
             else f"container memory_limit {config.memory_limit / 2**20:.0f} MiB" if config.memory_limit
             else "the host's memory")  # fmt: skip
    search = Search(config, launch=bench.launch, measure=lambda running: measure(running, workload, settings=settings),
                    planner=planner, n_layer=n_layer, budget=where, log=log)  # fmt: skip
    return search.run()


@pytest.fixture
def llama_search(request: pytest.FixtureRequest) -> Callable[[], SearchResult]:
    """``llama_search()``: run this item's search; the result (every probe) goes in the report."""
    from pytest_llamabench.plugin.run import STATE

    config = getattr(request, "param", None)
    if not isinstance(config, ServerConfig) or config.search is None:
        raise pytest.UsageError("llama_search is parametrized by the llamabench plugin with search configs")
    state = request.config.stash[STATE]
    item = request.node

    def run() -> SearchResult:
        try:
            result = run_search(config, state, state.bench.log)
        except LlamabenchError as exc:  # the probes made so far are in the report too
            partial = exc.context.get("search")
            _record(item, config, partial if isinstance(partial, SearchResult) else None, exc)
            pytest.fail(f"{exc.kind}: {exc.message}", pytrace=False)
        _record(item, config, result, None)
        return result

    return run


def _record(item: pytest.Item, config: ServerConfig, result: SearchResult | None, exc: LlamabenchError | None) -> None:
    entry = ResultEntry(item.nodeid, config.name, None, description=config.description,
                        extra={"search": result.as_dict()} if result is not None else {})  # fmt: skip
    if exc is not None:
        from pytest_llamabench.results import Failure

        entry.failure = Failure.from_exception(exc)
    item.user_properties.append((ENTRY, entry.as_dict()))


__all__ = ["llama_search", "parametrize", "run_search"]
