"""llama-server in a Docker container: ``ContainerServer``, same interface as ``LocalServer``.

A config with ``image = "..."`` runs here. The model file alone is mounted read-only
at ``/models/NAME`` (never its directory); the server runs unprivileged (``CONFINEMENT``),
listens on 0.0.0.0:8080 inside and is published only on the host's 127.0.0.1 (random
port). The container's output is streamed into the per-config log, so readiness and failure
classification work as for a local process; ``State.OOMKilled`` / exit 137 become a host OOM.

Every container carries owner labels and is removed by ``stop()`` (stop, then
remove); the Docker client, the labels and the cleanup of leftovers are in docker.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pytest_llamabench.server.classify import classify_failure
from pytest_llamabench.config import ServerConfig
from pytest_llamabench.hardware.device import Device
from pytest_llamabench.errors import ConfigError, DockerUnavailable, GpuUnavailable, ServerExited, ServerOutOfMemory, ServerStartError
from pytest_llamabench.server.docker import _DAEMON_HINT, DockerClient, container_name, docker_client, owner_labels, remote_engine
from pytest_llamabench.server.image import DEFAULT_TAG
from pytest_llamabench.server import watchdog
from pytest_llamabench.server.launcher import HARNESS_ENV, Server, process_peak_rss_mib, redacted

try:
    import docker
except ImportError:  # pragma: no cover - reported by docker_client()
    docker = None

CONTAINER_PORT = 8080
MODELS_DIR = "/models"
#: The server runs as nobody (or as the host user, when that is not root), with no capabilities,
#: no privilege escalation and a read-only root file system; tini (``init``) as PID 1 forwards
#: SIGTERM, which llama-server as PID 1 ignores while it loads.
NOBODY = "65534:65534"
CONFINEMENT: dict[str, Any] = {
    "init": True,
    "cap_drop": ["ALL"],
    "security_opt": ["no-new-privileges"],
    "read_only": True,
    "tmpfs": {"/tmp": "rw,noexec,nosuid,size=64m"},
}
_MIB = 1024 * 1024
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_IMAGE_ENV = re.compile(r"^LLAMA_ARG_\w+=")  # server defaults an image may set (values are args, not secrets)


# -- images --------------------------------------------------------------------------


def split_pinned(ref: str, where: str) -> tuple[str, str | None]:
    """``name[:tag]@sha256:...`` -> (name[:tag], digest); unpinned -> (ref, None)."""
    name, sep, digest = ref.partition("@")
    if not sep:
        return ref, None
    if not _DIGEST.fullmatch(digest):
        raise ConfigError(f"{where}: {digest!r} is not a digest; pin images as NAME[:TAG]@sha256:<64 hex digits>")
    return name, digest


def image_matches(image: Any, digest: str) -> bool:
    """Whether ``digest`` is the image's ID or one of its registry digests."""
    repo_digests = image.attrs.get("RepoDigests") or []
    return digest == image.id or any(d.endswith(f"@{digest}") for d in repo_digests)


def image_digest(image: Any, pinned: str | None = None) -> str:
    """What ran: the pinned digest if it matched, else the first RepoDigest, else the image ID."""
    if pinned is not None and image_matches(image, pinned):
        return pinned
    repo_digests = image.attrs.get("RepoDigests") or []
    return str(repo_digests[0]).partition("@")[2] if repo_digests else str(image.id)


def resolve_image(client: DockerClient, ref: str, *, where: str) -> Any:
    """The local image for ``ref`` (pulled if absent and a registry answers); pins verified."""
    name, pinned = split_pinned(ref, where)
    image = _get_image(client, ref)
    if image is not None and (pinned is None or image_matches(image, pinned)):
        return image
    local = None
    if pinned is not None:  # a locally built image has no registry digest: pinned by its ID
        local = _get_image(client, name)
        if local is not None and image_matches(local, pinned):
            return local
    try:
        image = client.images.pull(ref)
    except docker.errors.DockerException as exc:
        raise _missing_image(ref, pinned, local, exc, where) from None
    if pinned is not None and not image_matches(image, pinned):
        raise _missing_image(ref, pinned, image, None, where)
    return image


def _get_image(client: DockerClient, ref: str) -> Any:
    try:
        return client.images.get(ref)
    except docker.errors.ImageNotFound:
        return None
    except docker.errors.APIError as exc:
        if exc.status_code in (400, 404):  # e.g. a digest lookup the daemon cannot do locally
            return None
        raise DockerUnavailable(f"docker could not look up image {ref!r}: {exc.explanation or exc}") from None


def _missing_image(ref: str, pinned: str | None, found: Any, exc: Exception | None, where: str) -> DockerUnavailable:
    if found is not None:
        return DockerUnavailable(
            f"{where}: the config pins {pinned}, but the local {ref.partition('@')[0]!r} is {found.id} "
            f"(registry digests: {', '.join(found.attrs.get('RepoDigests') or []) or 'none'}); build or pull "
            "the pinned image, or update the digest in the config"
        )
    return DockerUnavailable(
        f"{where}: image {ref!r} is not on this machine and could not be pulled ({exc}); build the local "
        f"llama-server image with `python -m pytest_llamabench docker-image` (tag {DEFAULT_TAG}) "
        f"or run `docker pull {ref}` where a registry is reachable"
    )


# -- the server ---------------------------------------------------------------------


def container_user(files: Sequence[Path], *, where: str) -> str:
    """``uid:gid`` the server runs as: the host user's own, or nobody when pytest runs as root
    (then every mounted file must be readable by others; else one clear error before launch)."""
    uid = os.getuid()
    if uid != 0:
        return f"{uid}:{os.getgid()}"
    for path in files:
        if path.exists() and not path.stat().st_mode & stat.S_IROTH:  # a missing one: verify_model says so
            raise ConfigError(
                f"{where}: {path} is not readable by others, and a container's server runs as nobody "
                f"({NOBODY}) when pytest runs as root; make it readable (chmod o+r {path}) or run pytest "
                "as the file's owner"
            )
    return NOBODY


def _returncode(exit_code: int | None) -> int | None:
    """Docker's 128+N for a signal -> Popen's -N (137 -> -SIGKILL)."""
    if exit_code is None or not 128 < exit_code < 128 + 65:
        return exit_code
    try:
        return -signal.Signals(exit_code - 128)
    except ValueError:
        return exit_code


def _stream_logs(container: Any, path: Path) -> None:
    """Append the container's output to ``path`` until it stops (runs in a thread)."""
    try:
        stream = container.logs(stream=True, follow=True)
    except Exception:  # noqa: BLE001 - removed container or lost daemon: no log to follow
        return
    with path.open("ab") as log, contextlib.closing(stream):  # closing: else the socket leaks
        try:
            for chunk in stream:
                log.write(chunk)
                log.flush()
        except Exception:  # noqa: BLE001 - removed container or lost daemon: the log simply ends
            return


class ContainerServer(Server):
    """llama-server in a Docker container built from ``config.image``."""

    launcher = "docker"

    def __init__(
        self,
        config: ServerConfig,
        *,
        run_id: str,
        log_dir: Path,
        api_key: str | None = None,
        client: DockerClient | None = None,
        devices: Sequence[Device] | None = None,
    ) -> None:
        if not config.image:
            raise ConfigError(f"{config.source}: config {config.name} has no image; set image = \"...\"")
        super().__init__(config, log_dir=log_dir, api_key=api_key, devices=devices)
        self.run_id = run_id
        self._docker = client
        self._owns_client = client is None
        self._container: Any = None
        self._log_thread: threading.Thread | None = None
        self._image_id: str | None = None
        self._image_digest: str | None = None
        self._image_env: list[str] = []
        self.container_id: str | None = None
        self.container_name: str | None = None
        self._port: int | None = None
        self._peak_mib: float | None = None

    # -- launch ------------------------------------------------------------------

    def _launch(self, model_path: Path) -> None:
        if self._docker is None and (remote := remote_engine()):
            raise DockerUnavailable(
                f"DOCKER_HOST={remote}: the Docker engine is on another machine, where the server's port is "
                "published on that machine's 127.0.0.1 only (servers never listen on a network) and the model "
                "must be at the same path; run pytest on the GPU host itself (one CI job or `ssh HOST pytest "
                "--llamabench-shard=i/N ...` per host), with DOCKER_HOST unset or local there"
            )
        if self._docker is None:
            self._docker = docker_client()
        assert self.config.image is not None
        where = f"{self.config.source}.image"
        image = resolve_image(self._docker, self.config.image, where=where)
        self._image_id = str(image.id)
        self._image_digest = image_digest(image, split_pinned(self.config.image, where)[1])
        self._image_env = [e for e in (image.attrs.get("Config") or {}).get("Env") or [] if _IMAGE_ENV.match(e)]
        self.container_name = container_name(self.run_id, self.config.instance)
        self.base_url, self._port, self._peak_mib = None, None, None  # a restart gets a new port
        kwargs = self._create_args(model_path.resolve())
        watchdog.uses_docker(self.run_id)  # a SIGKILLed pytest's container goes too (watchdog.py)
        with self.log_path.open("wb") as log:
            log.write(f"# docker: {self.config.image} ({self._image_id}) {' '.join(redacted(kwargs['command']))}\n".encode())
        try:
            self._container = self._docker.containers.create(self._image_id, **kwargs)
            self.container_id = str(self._container.id)
            self._container.start()
        except docker.errors.APIError as exc:
            raise self._start_error(exc) from None
        self._log_thread = threading.Thread(
            target=_stream_logs, args=(self._container, self.log_path), name=f"logs-{self.container_name}", daemon=True
        )
        self._log_thread.start()

    def _create_args(self, model_path: Path) -> dict[str, Any]:
        args, file_volumes = _mount_file_args(self.args)
        command = ["--model", f"{MODELS_DIR}/{model_path.name}", "--host", "0.0.0.0",
                   "--port", str(CONTAINER_PORT), *args]  # fmt: skip
        kwargs: dict[str, Any] = {
            "command": command,
            "name": self.container_name,
            "detach": True,
            "environment": self._environment(),
            "labels": owner_labels(self.run_id, self.config.name),
            "ports": {f"{CONTAINER_PORT}/tcp": ("127.0.0.1", None)},  # never on other interfaces
            # only the files the server reads, read-only; never their directories
            "volumes": {str(model_path): {"bind": f"{MODELS_DIR}/{model_path.name}", "mode": "ro"}, **file_volumes},
            **CONFINEMENT,
            "user": container_user([model_path, *(Path(v) for v in file_volumes)], where=f"{self.config.source} (model)"),
        }
        if self.config.memory_limit:
            kwargs["mem_limit"] = self.config.memory_limit
            kwargs["memswap_limit"] = self.config.memory_limit  # equal: no swap
        if self.config.gpu:
            kwargs["device_requests"] = self._device_requests()
        pinned = os.sched_getaffinity(0)
        if len(pinned) < (os.cpu_count() or 0):  # an xdist worker's share (hardware.placement): the same cores
            kwargs["cpuset_cpus"] = ",".join(map(str, sorted(pinned)))
        return kwargs

    def _device_requests(self) -> list[Any]:
        """Every GPU (``count=-1``), or exactly ``self.devices`` by UUID (none for an empty selection)."""
        if self.devices is None:
            return [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])]
        if not self.devices:
            return []
        return [docker.types.DeviceRequest(device_ids=[d.uuid for d in self.devices], capabilities=[["gpu"]])]

    def _environment(self) -> dict[str, str]:
        """Only the config's env and the API key: the host environment stays outside."""
        env = {**HARNESS_ENV, **self.config.env}  # the load lines the memory report reads (launcher.py)
        if self.api_key:
            env["LLAMA_API_KEY"] = self.api_key  # never on argv: argv goes into reports
        return env

    def _start_error(self, exc: Any) -> ServerStartError:
        text = str(exc.explanation or exc)
        if "could not select device driver" in text:
            return GpuUnavailable(
                f"{self.config.source}: config {self.config.name} sets gpu = true, but the Docker engine has no "
                f"GPU runtime ({text}); install the NVIDIA Container Toolkit and restart dockerd, "
                "or set gpu = false"
            )
        return DockerUnavailable(f"{self.config.name}: docker could not start the container: {text}")

    # -- watch ----------------------------------------------------------------------

    def _state(self) -> dict[str, Any]:
        """The container's State (refreshed); {} once it is gone."""
        if self._container is None:
            return {}
        try:
            self._container.reload()
        except docker.errors.NotFound:
            return {}
        except (docker.errors.DockerException, OSError) as exc:
            raise DockerUnavailable(f"{self.config.name}: lost the Docker daemon ({exc}); {_DAEMON_HINT}") from None
        return dict(self._container.attrs.get("State") or {})

    def _alive(self) -> bool:
        return bool(self._state().get("Running"))

    def _discover_url(self) -> str | None:
        if self._port is None and self._container is not None:
            bindings = (self._container.attrs.get("NetworkSettings") or {}).get("Ports") or {}
            for binding in bindings.get(f"{CONTAINER_PORT}/tcp") or []:
                if binding.get("HostIp") == "127.0.0.1" and binding.get("HostPort"):
                    self._port = int(binding["HostPort"])
        return f"http://127.0.0.1:{self._port}" if self._port else None

    def _exit_error(self) -> ServerStartError:
        state = self._state()
        self._join_logs()
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        if not state:
            gone = f"{self.config.name}: container {self.container_name} is gone (removed by someone else?)"
            return ServerExited(gone, log_tail=self.log_tail())
        oom_killed = bool(state.get("OOMKilled"))
        returncode = _returncode(state.get("ExitCode"))
        error = classify_failure(
            log, returncode, oom_killed=oom_killed, what=f"llama-server (container {self.container_name})"
        )
        if oom_killed and self.config.memory_limit and isinstance(error, ServerOutOfMemory) and not error.requested_mib:
            error = ServerOutOfMemory(
                f"llama-server (container {self.container_name}) was OOM-killed (exit 137): the container hit its "
                f"memory limit ({self.config.memory_limit / _MIB:.0f} MiB, memory_limit in {self.config.source}); "
                'raise memory_limit, lower ctx or use a smaller model, or mark the config expect = "oom"',
                device="host", log_tail=error.log_tail,
            )  # fmt: skip
        return error

    def _join_logs(self, timeout: float = 5.0) -> None:
        if self._log_thread is not None:
            self._log_thread.join(timeout)

    # -- stop --------------------------------------------------------------------------

    def _terminate(self) -> None:
        container, self._container = self._container, None
        if container is not None:
            with contextlib.suppress(docker.errors.DockerException, OSError):
                self._sample_memory(container)
            with contextlib.suppress(docker.errors.DockerException, OSError):
                container.stop(timeout=5)
            with contextlib.suppress(docker.errors.DockerException, OSError):
                container.remove(force=True)
            self._join_logs()
            self._log_thread = None
        if self._owns_client and self._docker is not None:
            self._docker.close()
            self._docker = None

    # -- measurements ----------------------------------------------------------------

    def pids(self) -> set[int]:
        """Host PIDs of the container's processes (``docker top``), else State.Pid."""
        if self._container is None:
            return set()
        try:
            top = self._container.top()
            column = top["Titles"].index("PID")
            return {int(row[column]) for row in top.get("Processes") or []}
        except (docker.errors.DockerException, OSError, KeyError, ValueError):
            pid = int((self._container.attrs.get("State") or {}).get("Pid") or 0)  # as of the last reload
            return {pid} if pid > 0 else set()

    def peak_rss_mib(self) -> float | None:
        """Peak RSS of the container's processes as for a local server (``VmHWM``, readable when
        the daemon runs on this host), so local and container configs compare; else the
        container cgroup's peak (cgroup v1 ``max_usage``; else current usage), which leaves
        out page-cache pages of a memory-mapped model."""
        peaks = [p for p in map(process_peak_rss_mib, self.pids()) if p is not None]
        if peaks:
            self._peak_mib = max(self._peak_mib or 0.0, max(peaks))
            return self._peak_mib
        if self._container is not None:
            with contextlib.suppress(docker.errors.DockerException, OSError):
                self._sample_memory(self._container)
        return self._peak_mib

    def _sample_memory(self, container: Any) -> None:
        stats = container.stats(stream=False, one_shot=True)
        memory = stats.get("memory_stats") or {}
        value = memory.get("max_usage") or memory.get("usage")
        if value:
            self._peak_mib = max(self._peak_mib or 0.0, value / _MIB)

    def describe(self) -> dict[str, Any]:
        info = super().describe()
        info.update(
            image=self.config.image,
            image_id=self._image_id,
            image_digest=self._image_digest,
            image_env=list(self._image_env),
            container_id=self.container_id,
            container_name=self.container_name,
            memory_limit=self.config.memory_limit,
        )
        return info


#: Flags whose value is a host file (the vision projector, a chat template file): mounted read-only.
_FILE_FLAGS = ("--mmproj", "--chat-template-file")


def _mount_file_args(args: list[str]) -> tuple[list[str], dict[str, dict[str, str]]]:
    """``args`` with host file paths rewritten to ``/files/N/NAME``, and the volumes that make them so."""
    out, volumes = list(args), dict[str, dict[str, str]]()
    for i, arg in enumerate(out[:-1]):
        if arg in _FILE_FLAGS:
            host = Path(out[i + 1]).resolve()
            bind = f"/files/{len(volumes)}/{host.name}"
            volumes[str(host)] = {"bind": bind, "mode": "ro"}  # the file only, not its directory
            out[i + 1] = bind
    return out, volumes
