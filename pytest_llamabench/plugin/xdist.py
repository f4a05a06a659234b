"""Hooks that exist only with pytest-xdist (pytest-randomly's pattern)."""

from __future__ import annotations

from typing import Any

import pytest

from pytest_llamabench.plugin import workers
from pytest_llamabench.plugin.run import RunState
from pytest_llamabench.server import watchdog


class XdistHooks:
    def __init__(self, state: RunState) -> None:
        self.state = state

    def pytest_configure_node(self, node: Any) -> None:
        node.workerinput["llamabench_run_id"] = self.state.bench.settings.run_id
        node.workerinput["llamabench_controller"] = watchdog.controller_token()  # a killed controller's
        # workers lose their servers within seconds too (server/watchdog.py)

    def pytest_xdist_make_scheduler(self, config: pytest.Config, log: Any) -> Any:
        """With a matrix and ``--dist load`` (xdist's default for -n) or ``loadgroup``: one config
        start per scope, so its workloads share one server on one worker (``workers.make_scheduler``)."""
        if self.state.matrix is None or config.getoption("dist", "no") not in ("load", "loadgroup"):
            return None
        return workers.make_scheduler(config, log, lambda: [c.instance for c in self.state.server_starts()])
