"""Start and stop one llama-server for one config: as a local process or (container.py) in Docker.

Plain, pytest-free: ``with LocalServer(config, binary=...) as server: ...``.

A launch is: verify the model file, resolve the context size, start the server
on 127.0.0.1 with a free port, wait until it is ready (one deadline; an early
exit raises at once, classified from its log), and always stop it again.
"""

from __future__ import annotations

import abc
import atexit
import contextlib
import ctypes
import os
import re
import signal
import subprocess
import time
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from pytest_llamabench.server.classify import classify_failure
from pytest_llamabench.server.client import LlamaClient
from pytest_llamabench.config import HostMemoryContext, ServerConfig
from pytest_llamabench.errors import LlamabenchError, ServerDied, ServerNotReady, ServerStartError
from pytest_llamabench.hardware.device import VISIBLE_DEVICES, Device, visible_devices_env
from pytest_llamabench.model.files import ModelInfo, ctx_for_host_memory, verify_model
from pytest_llamabench.server import watchdog
from pytest_llamabench.model.projector import ProjectorInfo, vision_projector
from pytest_llamabench.server.arch import check_architecture

#: Environment variables llama-server reads as defaults; stripped unless the config sets them.
_STRIPPED_ENV = re.compile(r"^(LLAMA_ARG_\w+|LLAMA_SERVER_DEBUG_FAKE_TIMING|LLAMA_API_KEY)$")
_LISTENING = re.compile(r"listening on http://([\d.]+):(\d+)")
_LIVE: weakref.WeakSet[Server] = weakref.WeakSet()


def redacted(argv: Sequence[str]) -> list[str]:
    """argv with API keys replaced by ``***``: what reports, logs and messages show."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--api-key" and i + 1 < len(out):
            out[i + 1] = "***"
        elif arg.startswith("--api-key="):
            out[i] = "--api-key=***"
    return out


#: Environment variable names whose values reports show as ``***``.
_SECRET_NAME = re.compile(r"KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL", re.IGNORECASE)


def redacted_env(env: Mapping[str, str]) -> dict[str, str]:
    """A config's environment for reports: values of secret-looking names become ``***``."""
    return {k: ("***" if _SECRET_NAME.search(k) else str(v)) for k, v in env.items()}


def api_key_of(config: ServerConfig) -> str | None:
    """A key the config gives its server (``args = ["--api-key", …]`` or ``env.LLAMA_API_KEY``), so
    the client sends it too."""
    args = list(config.args)
    for i, arg in enumerate(args):
        if arg == "--api-key" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--api-key="):
            return arg.partition("=")[2]
    return config.env.get("LLAMA_API_KEY")


#: Set for every server, under the config's own env: llama.cpp logs its load lines (buffer sizes of
#: the model, KV cache and compute per device) at verbosity 4; the memory report reads them
#: (``model.plan.reported_buffers``). An environment variable, so argv stays the user's own.
HARNESS_ENV = {"LLAMA_ARG_LOG_VERBOSITY": "4"}


def server_environment(
    config_env: Mapping[str, str], api_key: str | None, devices: Sequence[Device] | None = None
) -> dict[str, str]:
    """The parent's environment without llama-server's own defaults, plus the config's.

    ``devices``: the server sees exactly those GPUs (``CUDA_VISIBLE_DEVICES`` by UUID and
    ``CUDA_DEVICE_ORDER``), unless the config's own env sets ``CUDA_VISIBLE_DEVICES``: then
    neither is added. ``None`` leaves the parent's setting.
    """
    env = {k: v for k, v in os.environ.items() if not _STRIPPED_ENV.match(k)}
    env.update(HARNESS_ENV)
    if devices is not None and VISIBLE_DEVICES not in config_env:
        env.update(visible_devices_env(devices))
    env.update(config_env)
    if api_key:
        env["LLAMA_API_KEY"] = api_key  # never on argv: argv goes into reports
    return env


class Server(abc.ABC):
    """One running llama-server. Subclasses say how to start, watch and stop it."""

    launcher = "abstract"
    host = "127.0.0.1"

    def __init__(
        self,
        config: ServerConfig,
        *,
        log_dir: Path,
        api_key: str | None = None,
        devices: Sequence[Device] | None = None,
    ) -> None:
        self.config = config
        self.log_path = log_dir / f"{config.instance}.log"
        self.api_key = api_key_of(config) or api_key
        self.devices: tuple[Device, ...] | None = None if devices is None else tuple(devices)  # None: as inherited
        self.model_info: ModelInfo | None = None
        self.projector: ProjectorInfo | None = None
        self.args: list[str] = []
        self.base_url: str | None = None
        self.props: dict[str, Any] = {}
        self.load_seconds: float | None = None
        self._client: LlamaClient | None = None
        self._death_reported = False

    # -- lifecycle --------------------------------------------------------------

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        """Launch and wait until /health is 200. Raises a classified ServerStartError."""
        config = self.config
        model_path = config.model.resolve()
        self.model_info = verify_model(
            model_path, sha256=config.model.sha256, size=config.model.size, where=f"{config.source} (model)",
            rehash=config.model.verify == "always",
        )
        self._preflight(model_path, self.model_info)
        self.projector = vision_projector(config, self.model_info)
        self.args = config.server_args(ctx=self._resolve_ctx(self.model_info))
        if self.projector is not None:
            self.args += ["--mmproj", str(self.projector.path)]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        _LIVE.add(self)
        try:
            self._launch(model_path)
            self._wait_ready(started + config.ready_timeout_s)
            self.load_seconds = time.monotonic() - started
            self.props = self.client.props()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop the server; safe to call twice and from atexit."""
        if self._client is not None:
            self._client.close()
            self._client = None
        self._terminate()
        _LIVE.discard(self)

    # -- what tests and measurements use --------------------------------------------

    @property
    def client(self) -> LlamaClient:
        if self._client is None:
            if self.base_url is None:
                raise ServerStartError(f"{self.config.name}: the server is not started")
            self._client = LlamaClient(self.base_url, api_key=self.api_key)
        return self._client

    @property
    def build_info(self) -> str | None:
        value = self.props.get("build_info")
        return str(value) if value else None

    def ensure_alive(self, grace_s: float = 1.0, dying_s: float = 5.0) -> None:
        """Raise ServerDied (classified from the log) if the server has gone away.

        Called after a request failed: a dying server closes its sockets a moment before it can be
        reaped, so give it ``grace_s`` to show as exited, and up to ``dying_s`` while its log still
        grows (a CUDA build that runs out of memory at its first request prints a backtrace for over
        a second before it exits: seen on an H200). A live server that logs nothing waits ``grace_s``.
        """
        start = time.monotonic()
        deadline, size = start + grace_s, self._log_size()
        while self._alive():
            now = time.monotonic()
            if now >= deadline:
                grown = self._log_size()
                if grown == size or now >= start + dying_s:
                    break
                deadline, size = now + 0.25, grown
            time.sleep(0.05)
        if not self._alive():
            cause = self._exit_error()
            when = "during an earlier workload" if self._death_reported else "during the workload"
            self._death_reported = True
            raise ServerDied(f"{self.config.name}: llama-server died {when}: {cause.message}", log_tail=cause.log_tail)

    def _log_size(self) -> int:
        try:
            return self.log_path.stat().st_size
        except OSError:
            return -1

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])

    def describe(self) -> dict[str, Any]:
        """Builtin-typed facts for reports: args actually used, build, launcher."""
        threads = self.config.server.get("threads")
        info: dict[str, Any] = {
            "launcher": self.launcher,
            "args": redacted(self.args),
            "build_info": self.build_info,
            "threads": threads,
            "load_s": self.load_seconds,
            "log": str(self.log_path),
        }
        if self.devices is not None:
            info["devices"] = [d.uuid for d in self.devices]
        if self.config.gpu:
            info["gpu"] = True
        if self.config.env:  # what a production copy of this server needs too; secrets as ***
            info["env"] = redacted_env(self.config.env)
        return info

    @abc.abstractmethod
    def pids(self) -> set[int]:
        """Host PIDs of the server's processes (for NVML per-process memory)."""

    @abc.abstractmethod
    def peak_rss_mib(self) -> float | None:
        """Peak resident memory of the server so far, if known."""

    # -- subclass hooks ----------------------------------------------------------

    @abc.abstractmethod
    def _launch(self, model_path: Path) -> None: ...

    def _preflight(self, model_path: Path, info: ModelInfo) -> None:
        """Checks before the launch that need the launcher (e.g. the binary's architectures)."""

    @abc.abstractmethod
    def _alive(self) -> bool: ...

    @abc.abstractmethod
    def _exit_error(self) -> ServerStartError:
        """Why the server is not running (classified from its log and status)."""

    @abc.abstractmethod
    def _terminate(self) -> None: ...

    def _discover_url(self) -> str | None:
        """The base URL once known (local servers read it from their log)."""
        return self.base_url

    # -- shared logic -------------------------------------------------------------

    def _resolve_ctx(self, info: ModelInfo) -> int | None:
        ctx = self.config.server.get("ctx")
        if isinstance(ctx, HostMemoryContext):
            return ctx_for_host_memory(
                info,
                ctx.factor,
                str(self.config.server.get("cache_type_k", "f16")),
                str(self.config.server.get("cache_type_v", "f16")),
            )
        return None

    def _wait_ready(self, deadline: float) -> None:
        """Poll: exited? -> classified error; URL known and /health 200 -> ready."""
        last_status = "no answer yet"
        while True:
            if not self._alive():
                raise self._exit_error()
            url = self._discover_url()
            if url is not None:
                self.base_url = url
                try:
                    status = self.client.health_status()
                    if status == 200:
                        return
                    last_status = f"/health answered {status}"
                except httpx.HTTPError as exc:
                    last_status = f"/health: {type(exc).__name__}"
            if time.monotonic() > deadline:
                raise ServerNotReady(
                    f"{self.config.name}: llama-server was not ready within {self.config.ready_timeout_s:g} s "
                    f"({last_status}); raise ready_timeout_s in {self.config.source} if loading is slow",
                    log_tail=self.log_tail(),
                )
            time.sleep(0.05)


def _die_with_parent() -> None:  # runs in the child between fork and exec
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: a killed pytest worker takes the server along


class LocalServer(Server):
    """llama-server as a child process in its own process group."""

    launcher = "process"

    def __init__(
        self,
        config: ServerConfig,
        *,
        binary: Path,
        log_dir: Path,
        api_key: str | None = None,
        devices: Sequence[Device] | None = None,
    ) -> None:
        super().__init__(config, log_dir=log_dir, api_key=api_key, devices=devices)
        self.binary = binary
        self._proc: subprocess.Popen[bytes] | None = None

    def _preflight(self, model_path: Path, info: ModelInfo) -> None:
        check_architecture(self.binary, info.architecture, model=model_path, where=f"{self.config.source} (model)")

    def _launch(self, model_path: Path) -> None:
        argv = [str(self.binary), "--model", str(model_path), "--host", self.host, "--port", "0", *self.args]
        with self.log_path.open("wb") as log:
            log.write(f"# {' '.join(redacted(argv))}\n".encode())
            log.flush()
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=server_environment(self.config.env, self.api_key, self.devices),
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        watchdog.track_process(self._proc.pid)  # a SIGKILLed pytest's server goes too (watchdog.py)

    def _discover_url(self) -> str | None:
        if self.base_url is None:
            with contextlib.suppress(OSError):
                if m := _LISTENING.search(self.log_path.read_text(errors="replace")):
                    return f"http://{m.group(1)}:{m.group(2)}"
        return self.base_url

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _exit_error(self) -> ServerStartError:
        code = self._proc.poll() if self._proc else None
        return classify_failure(self.log_path.read_text(errors="replace"), code)

    def _terminate(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        else:  # reap; also kill anything left in its group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        self._last_returncode = proc.returncode
        self._last_pid = proc.pid
        watchdog.untrack_process(proc.pid)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc else getattr(self, "_last_returncode", None)

    def pids(self) -> set[int]:
        return {self._proc.pid} if self._proc and self._proc.poll() is None else set()

    def peak_rss_mib(self) -> float | None:
        return process_peak_rss_mib(self._proc.pid) if self._proc else None


def process_peak_rss_mib(pid: int) -> float | None:
    """Peak resident memory (``VmHWM``) of a process on this host, if it can be read."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@atexit.register
def _stop_all() -> None:
    """Last line of defence: whatever exits the interpreter, no server outlives it."""
    for server in list(_LIVE):
        with contextlib.suppress(LlamabenchError, OSError):
            server.stop()
