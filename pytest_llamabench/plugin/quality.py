"""Quality workloads in a pytest run: planned at collection, run before their config's server.

llama-perplexity must not share the machine with a llama-server (on a GPU they fight for VRAM,
on a CPU each halves the other's numbers). pytest keeps one ``llama_server`` instance alive at a
time and tears the previous config's down before it sets up the next, so the ``llama_server``
fixture runs a config's quality workloads first, before it launches that config's server; a
config whose collected tests are all quality workloads starts no server at all. The results wait
here until their tests ask for them (``llamabench(llama_server, llama_workload)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TypeGuard

import pytest

from pytest_llamabench.config import ServerConfig, Workload
from pytest_llamabench.config_quality import QUALITY_KIND
from pytest_llamabench.errors import LlamabenchError
from pytest_llamabench.plugin.run import RunState
from pytest_llamabench.results import ResultEntry


def is_quality(workload: object) -> TypeGuard[Workload]:
    return isinstance(workload, Workload) and workload.kind == QUALITY_KIND


class NoServer:
    """What ``llama_server`` gives a config whose tests are all quality workloads: its config only."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config

    def __getattr__(self, name: str) -> object:
        raise AttributeError(
            f"config {self.config.name} runs only quality workloads, so no llama-server was started "
            f"(asked for {name!r}); add a completion or chat workload to measure a server"
        )


class QualityRuns:
    def __init__(self, state: RunState) -> None:
        self.state = state
        self.planned: dict[str, list[Workload]] = {}  # config start -> its quality workloads, in test order
        self.servers: set[str] = set()  # config starts whose other tests need a llama-server
        self._done: dict[tuple[str, str], ResultEntry | LlamabenchError] = {}

    def plan(self, items: Iterable[pytest.Item]) -> None:
        """Which config starts have quality tests, and which also need a server (collection)."""
        self.planned.clear()
        self.servers.clear()
        for item in items:
            params = getattr(getattr(item, "callspec", None), "params", {})
            config, workload = params.get("llama_server"), params.get("llama_workload")
            if not isinstance(config, ServerConfig):
                continue
            if is_quality(workload):
                planned = self.planned.setdefault(config.instance, [])
                if workload not in planned:
                    planned.append(workload)
            else:
                self.servers.add(config.instance)

    def needs_server(self, config: ServerConfig) -> bool:
        return config.instance in self.servers or config.instance not in self.planned

    def run_before_server(self, config: ServerConfig) -> None:
        """Run the config start's quality workloads now, while no server of this process is alive."""
        for workload in self.planned.get(config.instance, []):
            self._run(config, workload)

    def result(self, config: ServerConfig, workload: Workload) -> ResultEntry:
        """The entry of a quality test (run now if the fixture did not), or its failure raised."""
        value = self._run(config, workload)
        if isinstance(value, LlamabenchError):
            raise value
        return dataclasses.replace(value, test=f"{config.instance}-{workload.name}",
                                   start=config.start if config.restarts > 1 else None)  # fmt: skip

    def _run(self, config: ServerConfig, workload: Workload) -> ResultEntry | LlamabenchError:
        # deterministic: a config's later server starts reuse its first start's result
        key = (config.name, workload.name)
        if key not in self._done:
            try:
                self._done[key] = self._measure(config, workload)
            except LlamabenchError as exc:
                self._done[key] = exc
        return self._done[key]

    def _measure(self, config: ServerConfig, workload: Workload) -> ResultEntry:
        from pytest_llamabench.quality.run import QualitySettings, run_quality
        from pytest_llamabench.server.build import cache_root

        bench = self.state.bench
        path, where, _ = bench.binary()
        settings = QualitySettings(
            server_binary=path,
            server_where=where,
            cache_dir=cache_root() / "quality",
            log_dir=bench.settings.log_dir,
            devices=bench.devices_for(config),
            vram_budget=bench.settings.vram_budget,
            log=bench.log,
        )
        bench.log(f"{config.instance}/{workload.name}: llama-perplexity (no llama-server is running)")
        return run_quality(bench.placed(config), workload, settings, reference_config=self._reference_config(workload))

    def _reference_config(self, workload: Workload) -> ServerConfig | None:
        """The matrix's config of the reference model (its flags make the reference logits)."""
        spec = workload.quality
        if spec is None or spec.reference is None or self.state.matrix is None:
            return None
        configs = [c for c in self.state.matrix.configs.values() if c.model.name == spec.reference.name]
        configs.sort(key=lambda c: (not workload.applies_to(c), c.expect is not None))  # its own quality row first
        return configs[0] if configs else None


QUALITY = pytest.StashKey[QualityRuns]()

__all__ = ["NoServer", "QUALITY", "QualityRuns", "is_quality"]
