"""What one benchmark session needs around each server: pytest-free.

``Bench`` resolves the llama-server binary once, picks the launcher (process or
container), holds a VRAM budget (ballast) and samples VRAM while a config's
server lives, and turns a finished workload into a builtin-typed result entry.
"""

from __future__ import annotations

import contextlib
import dataclasses
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pytest_llamabench.server.build import BuildSpec, resolve_server_bin, server_version
from pytest_llamabench.config import ServerConfig, Thresholds, Workload
from pytest_llamabench.errors import LlamabenchError, ThresholdNotMet
from pytest_llamabench.server.launcher import LocalServer, Server
from pytest_llamabench.measure.workload import Measurement, Runner, run_workload


@dataclasses.dataclass
class BenchSettings:
    """Plain values the plugin reads off options/env/ini (pytest-free)."""

    log_dir: Path
    server_bin_candidates: list[tuple[str | None, str]]
    build_spec: BuildSpec = dataclasses.field(default_factory=BuildSpec)
    build_if_missing: bool = True
    vram_budget: int | None = None
    api_key: str | None = None
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])


class RunningServer:
    """A started server plus what was measured around it."""

    def __init__(self, server: Server, vram: Any = None, ballast: Any = None) -> None:
        self.server = server
        self.vram = vram
        self.ballast = ballast

    def __getattr__(self, name: str) -> Any:  # a RunningServer is used like its Server
        return getattr(self.server, name)

    def vram_peak_mib(self) -> float | None:
        return None if self.vram is None else self.vram.peak_mib

    def describe(self) -> dict[str, Any]:
        info = self.server.describe()
        if self.vram is not None:
            info["vram"] = self.vram.as_dict()
        if self.ballast is not None:
            info["vram_budget"] = self.ballast.as_dict()
        return info


class Bench:
    """Launches servers for configs; one ``Bench`` per pytest session (or script)."""

    def __init__(self, settings: BenchSettings, log: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.log = log
        self._binary: tuple[Path, str, str] | None = None

    def binary(self) -> tuple[Path, str, str]:
        """(path, where it came from, ``--version`` text), resolved once."""
        if self._binary is None:
            path, where = resolve_server_bin(
                self.settings.server_bin_candidates,
                spec=self.settings.build_spec,
                build_if_missing=self.settings.build_if_missing,
                log=self.log,
            )
            self._binary = (path, where, server_version(path))
        return self._binary

    def make_server(self, config: ServerConfig) -> Server:
        if config.image:
            from pytest_llamabench.server.container import ContainerServer

            return ContainerServer(
                config, log_dir=self.settings.log_dir, run_id=self.settings.run_id, api_key=self.settings.api_key
            )
        path, _, _ = self.binary()
        return LocalServer(config, binary=path, log_dir=self.settings.log_dir, api_key=self.settings.api_key)

    @contextlib.contextmanager
    def launch(self, config: ServerConfig) -> Iterator[RunningServer]:
        """Budget -> sampler -> server; torn down in reverse, whatever happens."""
        budget = config.vram_budget or (self.settings.vram_budget if config.gpu else None)
        with contextlib.ExitStack() as stack:
            ballast = None
            if budget:
                from pytest_llamabench.hardware.ballast import VramBallast

                ballast = stack.enter_context(VramBallast(budget))
            server = self.make_server(config)
            vram = None
            if config.gpu:
                from pytest_llamabench.hardware.gpu import VramSampler

                vram = stack.enter_context(VramSampler(server.pids))
            try:
                server.start()
            except LlamabenchError as exc:  # the report shows what was attempted
                exc.context["server"] = server.describe()
                exc.context["model"] = server.model_info.as_dict() if server.model_info else None
                raise
            stack.callback(server.stop)
            yield RunningServer(server, vram, ballast)

    def describe_binary(self) -> dict[str, Any]:
        if self._binary is None:
            return {}
        path, where, version = self._binary
        return {"path": str(path), "source": where, "version": version}


def measure(
    running: RunningServer, workload: Workload, *, runner: Runner | None = None
) -> tuple[Measurement, dict[str, Any]]:
    """Run a workload and build the report entry (builtin types only)."""
    measurement = run_workload(running.server, workload, runner=runner)
    measurement.rss_peak_mib = running.server.peak_rss_mib()
    measurement.vram_peak_mib = running.vram_peak_mib()
    return measurement, result_entry(running, workload, measurement)


def result_entry(running: RunningServer | None, workload: Workload, measurement: Measurement | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"workload": workload.name, "workload_spec": dataclasses.asdict(workload)}
    if running is not None:
        entry["config"] = running.server.config.name
        entry["server"] = running.describe()
        info = running.server.model_info
        entry["model"] = info.as_dict() if info else None
    if measurement is not None:
        entry["metrics"] = measurement.metrics()
        entry["endpoint"] = measurement.endpoint
    return entry


_CHECKS: dict[str, tuple[str, Callable[[float, float], bool], str]] = {
    "min_gen_tok_s": ("gen_tok_s", lambda measured, limit: measured >= limit, "tok/s"),
    "min_prompt_tok_s": ("prompt_tok_s", lambda measured, limit: measured >= limit, "tok/s"),
    "max_ttft_ms": ("ttft_ms", lambda measured, limit: measured <= limit, "ms"),
    "max_rss_mib": ("rss_peak_mib", lambda measured, limit: measured <= limit, "MiB"),
    "max_vram_mib": ("vram_peak_mib", lambda measured, limit: measured <= limit, "MiB"),
}


def check_thresholds(measurement: Measurement, thresholds: Thresholds) -> None:
    """Raise ThresholdNotMet listing every miss: measured vs required, and where it was set."""
    misses = []
    for key, limit in thresholds.items():
        metric, ok, unit = _CHECKS[key]
        measured = measurement.median(metric)
        if measured is None:
            misses.append(f"{key} = {limit:g} {unit}: {metric} was not measured (no GPU?)")
        elif not ok(measured, limit):
            misses.append(f"{metric} median {measured:.1f} {unit}, required {key} = {limit:g} {unit}")
    if misses:
        raise ThresholdNotMet(
            f"{measurement.config}/{measurement.workload}: threshold not met: "
            + "; ".join(misses)
            + f" (set in {thresholds.source}); lower the threshold there or fix the regression"
        )


__all__ = ["Bench", "BenchSettings", "RunningServer", "check_thresholds", "measure"]
