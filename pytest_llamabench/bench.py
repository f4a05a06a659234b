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
from pytest_llamabench.config import ServerConfig, Workload
from pytest_llamabench.errors import LlamabenchError
from pytest_llamabench.server.launcher import LocalServer, Server
from pytest_llamabench.hardware.device import Device
from pytest_llamabench.hardware.placement import Placement, pin
from pytest_llamabench.measure.workload import Runner, run_workload
from pytest_llamabench.hardware.host import CpuContention
from pytest_llamabench.metrics import GEN_TOK_S
from pytest_llamabench.progress import ProgressCallback, ServerReady
from pytest_llamabench.results import ResultEntry


@dataclasses.dataclass
class BenchSettings:
    """Plain values the plugin reads off options/env/ini (pytest-free)."""

    log_dir: Path
    server_bin_candidates: list[tuple[str | None, str]]
    build_spec: BuildSpec = dataclasses.field(default_factory=BuildSpec)
    build_if_missing: bool = True
    #: GPU configs on a machine with a usable GPU: a cached CUDA build wins over the CPU one
    prefer_cuda: bool = False
    vram_budget: int | None = None
    #: The GPUs of GPU configs (``hardware.device.discover_devices()``): each server sees exactly
    #: these, the VRAM budget is held on each, the sampler reads only these. ``None``: as before
    #: (servers inherit CUDA_VISIBLE_DEVICES, the budget is on CUDA device 0, all are sampled).
    devices: tuple[Device, ...] | None = None
    #: This process's share of the host under pytest-xdist (``hardware.placement``): its GPUs (a
    #: config gets the first ``gpus`` of them) and cores (pinned before its first server starts).
    #: When set, it wins over ``devices``.
    placement: Placement | None = None
    api_key: str | None = None
    run_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex[:12])


class RunningServer:
    """A started server plus what was measured around it."""

    def __init__(self, server: Server, vram: Any = None, ballast: Any = None,
                 log: Callable[[str], None] = print) -> None:  # fmt: skip
        self.server = server
        self.vram = vram
        self.ballast = ballast
        self.log = log
        self.placement: Placement | None = None  # the worker's share it ran in (pytest-xdist)
        self.plan: Any = None  # planning.LaunchPlan: the memory plan made before the launch

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
        if self.placement is not None:
            info["placement"] = self.placement.as_dict()
        return info


class Bench:
    """Launches servers for configs; one ``Bench`` per pytest session (or script)."""

    def __init__(self, settings: BenchSettings, log: Callable[[str], None] = print) -> None:
        self.settings = settings
        self.log = log
        self.progress: ProgressCallback | None = None  # hears of servers ready (progress.ServerReady)
        self._binary: tuple[Path, str, str] | None = None

    def binary(self) -> tuple[Path, str, str]:
        """(path, where it came from, ``--version`` text), resolved once."""
        if self._binary is None:
            path, where = resolve_server_bin(
                self.settings.server_bin_candidates,
                spec=self.settings.build_spec,
                build_if_missing=self.settings.build_if_missing,
                log=self.log,
                prefer_cuda=self.settings.prefer_cuda,
            )
            self._binary = (path, where, server_version(path))
        return self._binary

    def devices_for(self, config: ServerConfig) -> tuple[Device, ...] | None:
        """The GPUs a config's server sees: its share of this process's placement (or ``devices``)."""
        if self.settings.placement is not None:
            return self.settings.placement.devices_for(config)
        return self.settings.devices if config.gpu else None

    def placed(self, config: ServerConfig) -> ServerConfig:
        """The config as it runs here: ``threads`` = this worker's cores unless it sets threads."""
        return config if self.settings.placement is None else self.settings.placement.with_threads(config)

    def existing_binary(self) -> Path | None:
        """The local llama-server if one is there already (never builds), else None."""
        if self._binary is not None:
            return self._binary[0]
        try:
            path, _ = resolve_server_bin(self.settings.server_bin_candidates, spec=self.settings.build_spec,
                                         build_if_missing=False, log=self.log)  # fmt: skip
        except LlamabenchError:
            return None
        return path

    def make_server(self, config: ServerConfig) -> Server:
        devices = self.devices_for(config)
        if config.image:
            from pytest_llamabench.server.container import ContainerServer

            return ContainerServer(
                config,
                log_dir=self.settings.log_dir,
                run_id=self.settings.run_id,
                api_key=self.settings.api_key,
                devices=devices,
            )
        path, _, _ = self.binary()
        return LocalServer(
            config, binary=path, log_dir=self.settings.log_dir, api_key=self.settings.api_key, devices=devices
        )

    @contextlib.contextmanager
    def launch(self, config: ServerConfig) -> Iterator[RunningServer]:
        """Budget -> sampler -> server; torn down in reverse, whatever happens."""
        config = self.placed(config)
        if config.model.quantize is not None:  # made with the pinned llama-quantize first (quality/quantize.py)
            from pytest_llamabench.quality.quantize import materialize

            config = materialize(config, *self.binary()[:2], log=self.log)
        budget = config.budget(self.settings.vram_budget)
        devices = self.devices_for(config)
        if self.settings.placement is not None:
            pin(self.settings.placement.cpus)  # this process, and so the server and its client
        if devices is not None and not devices:
            from pytest_llamabench.errors import GpuUnavailable

            raise GpuUnavailable(
                f"{config.source}: config {config.name} sets gpu = true, but no GPU is selected for this "
                "session (CUDA_VISIBLE_DEVICES hides them all?); select a GPU or set gpu = false"
            )
        launch_plan = self.plan_launch(config, budget, devices)
        with contextlib.ExitStack() as stack:
            ballast = None
            if budget:
                from pytest_llamabench.hardware.ballast import VramBallast

                ballast = stack.enter_context(VramBallast(budget, devices=devices))
            server = self.make_server(config)
            vram = None
            if config.gpu:
                from pytest_llamabench.hardware.vram import VramSampler

                vram = stack.enter_context(VramSampler(server.pids, devices=devices))
            try:
                server.start()
            except LlamabenchError as exc:  # the report shows what was attempted
                exc.context["server"] = server.describe()
                exc.context["model"] = server.model_info.as_dict() if server.model_info else None
                exc.context["memory"] = launch_plan.facts(_read(server.log_path)) if launch_plan else None
                raise
            stack.callback(server.stop)
            if self.progress is not None:
                self.progress(ServerReady(config.instance, server.load_seconds))
            running = RunningServer(server, vram, ballast, log=self.log)
            running.placement = self.settings.placement
            running.plan = launch_plan
            yield running

    def plan_launch(self, config: ServerConfig, budget: int | None, devices: Any) -> Any:
        """The memory plan of ``config`` (planning.py), said before its launch; None if the model is unreadable."""
        from pytest_llamabench.planning import LaunchPlan, gpu_memory_of

        total, index = gpu_memory_of(devices) if config.gpu else (None, None)
        launch_plan = LaunchPlan.for_config(config, budget=budget, gpu_memory=total, gpu_index=index)
        if launch_plan is not None:
            self.log(launch_plan.line())
        return launch_plan

    def describe_binary(self) -> dict[str, Any]:
        if self._binary is None:
            return {}
        path, where, version = self._binary
        return {"path": str(path), "source": where, "version": version}


@dataclasses.dataclass(frozen=True)
class MeasureSettings:
    """How a workload is measured: when the host counts as busy, how often to retry then, and
    the request timeout (None: each workload's own)."""

    busy_cores: float = 0.25
    retry_busy: int = 0
    timeout_s: float | None = None


def measure(
    running: RunningServer,
    workload: Workload,
    *,
    runner: Runner | None = None,
    settings: MeasureSettings = MeasureSettings(),
    progress: ProgressCallback | None = None,
) -> ResultEntry:
    """Run a workload on a running server: the typed result with the facts around it.

    The CPU time other processes took meanwhile is measured; a measurement taken on a busy
    host is marked (``host_load.busy``) and, with ``retry_busy``, taken again up to that often.
    """
    running.server.ensure_alive(grace_s=0)  # one that died during an earlier workload: say so
    for attempt in range(settings.retry_busy + 1):
        gpu_before = running.vram.contention() if running.vram is not None else (0, 0, 0)
        with CpuContention(running.server.pids, settings.busy_cores) as contention:
            measurement = run_workload(running.server, workload, runner=runner if attempt == 0 else None,
                                       timeout_s=settings.timeout_s, progress=progress)  # fmt: skip
        load = contention.as_dict()
        if running.vram is not None:
            samples, contended, throttled = (a - b for a, b in zip(running.vram.contention(), gpu_before))
            load.update(gpu_samples=samples, gpu_contended_samples=contended, gpu_throttled_samples=throttled,
                        gpu_foreign_pids=sorted(running.vram.foreign_pids),
                        gpu_throttle_reasons=sorted(running.vram.throttle_reasons))  # fmt: skip
            load["busy"] = load["busy"] or contended > 0 or throttled > 0
        if not load["busy"]:
            break
        running.log(f"{running.server.config.instance}/{workload.name}: the host was busy ({_busy_text(load)})"
                    + (", measuring again" if attempt < settings.retry_busy else ""))  # fmt: skip
    measurement.rss_peak_mib = running.server.peak_rss_mib()
    measurement.vram_peak_mib = running.vram_peak_mib()
    config = running.server.config
    info = running.server.model_info
    return ResultEntry(
        test=f"{config.instance}-{workload.name}",
        config=config.name,
        workload=workload.name,
        start=config.start if config.restarts > 1 else None,
        metrics=measurement.metrics(),
        endpoint=measurement.endpoint,
        server=running.describe(),
        model=info.as_dict() if info else None,
        workload_spec=dataclasses.asdict(workload),
        host_load={**load, "attempts": attempt + 1},
        details=measurement.facts or None,
        extra=_memory_facts(running, workload, measurement),
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _memory_facts(running: RunningServer, workload: Workload, measurement: Any) -> dict[str, Any]:
    """The launch's memory plan beside the server's reported buffers and the measured peaks, and the roofline."""
    if running.plan is None:
        return {}
    measured = {"vram_peak_mib": measurement.vram_peak_mib, "rss_peak_mib": measurement.rss_peak_mib}
    gen = measurement.metrics().get(GEN_TOK_S.name)
    return {"memory": running.plan.facts(_read(running.server.log_path), measured, dataclasses.asdict(workload),
                                         gen.median if gen is not None else None)}  # fmt: skip


def _busy_text(load: dict[str, Any]) -> str:
    parts = [f"other processes used {load['other_cores']:.2f} cores"] if load.get("other_cores") else []
    if load.get("gpu_contended_samples"):
        parts.append(f"other processes on the GPU: {load['gpu_foreign_pids']}")
    if load.get("gpu_throttled_samples"):
        parts.append(f"GPU clocks throttled ({', '.join(load['gpu_throttle_reasons'])})")
    return "; ".join(parts)


__all__ = ["Bench", "BenchSettings", "MeasureSettings", "RunningServer", "measure"]
