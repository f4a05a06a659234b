"""Hooks that exist only with pytest-xdist (pytest-randomly's pattern)."""

from __future__ import annotations

from typing import Any

from pytest_llamabench.plugin.run import RunState


class XdistHooks:
    def __init__(self, state: RunState) -> None:
        self.state = state

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["llamabench_run_id"] = self.state.bench.settings.run_id
