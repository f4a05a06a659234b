"""Docker access and container ownership: the SDK, a connected client, labels and cleanup.

Cleanup. Every container carries labels: ``pytest-llamabench=1``, the run id
(one per pytest session), the config, the owner (user, host, PID and PID start
time). It is removed by ``ContainerServer.stop()`` (stop, then remove), by
launcher.py's atexit hook, and otherwise:

* a SIGKILLed pytest-xdist worker runs no Python code: the controller removes
  that run's containers at session end (``remove_run_containers(client, run_id)``);
* a crashed or SIGKILLed whole session: the next session of the same user on the
  same host removes containers whose owner process is gone (``sweep_leftovers``).
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
import uuid
from pathlib import Path
from typing import Any

from pytest_llamabench.errors import DockerUnavailable

try:
    import docker
except ImportError:  # pragma: no cover - reported by docker_client()
    docker = None

#: The docker SDK is untyped; its client, containers and images are ``Any`` here.
DockerClient = Any

LABEL = "pytest-llamabench"
LABEL_RUN_ID = "pytest-llamabench.run-id"
LABEL_CONFIG = "pytest-llamabench.config"
LABEL_OWNER_PID = "pytest-llamabench.owner-pid"
LABEL_OWNER_START = "pytest-llamabench.owner-start"
LABEL_USER = "pytest-llamabench.user"
LABEL_HOST = "pytest-llamabench.host"

_DAEMON_HINT = (
    "start the daemon (sudo systemctl start docker), add your user to the docker group "
    "(sudo usermod -aG docker $USER, then log in again), or set DOCKER_HOST to a reachable daemon"
)


def docker_sdk() -> Any:
    """The docker SDK module (untyped); DockerUnavailable if it is not installed."""
    if docker is None:
        raise DockerUnavailable(
            "the docker Python package is not installed; install it with: python -m pip install docker"
        )
    return docker


def _socket_problem() -> str | None:
    """Why the local Docker socket is unusable, checked first: the SDK leaks a socket when connect fails."""
    host = os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not host.startswith("unix://"):
        return None
    path = host.removeprefix("unix://")
    if not os.path.exists(path):
        return f"no Docker socket at {path}"
    if not os.access(path, os.R_OK | os.W_OK):
        return f"user {os.getuid()} may not use {path}"
    return None


def remote_engine(host: str | None = None) -> str | None:
    """``DOCKER_HOST`` when it names an engine on another machine (``ssh://``, ``tcp://`` to a
    host other than this one), else None. A container's port is published on the engine host's
    127.0.0.1 only, so a harness elsewhere cannot reach the server."""
    host = os.environ.get("DOCKER_HOST", "") if host is None else host
    scheme, _, rest = host.partition("://")
    if scheme == "ssh":
        return host
    name = rest.rsplit("@", 1)[-1].split("/")[0].rsplit(":", 1)[0].strip("[]")
    return host if scheme in ("tcp", "http", "https") and name not in ("localhost", "127.0.0.1", "::1") else None


def docker_client() -> DockerClient:
    """A connected client from the environment (DOCKER_HOST, ...); DockerUnavailable if none."""
    docker_sdk()
    if problem := _socket_problem():
        raise DockerUnavailable(f"cannot reach the Docker daemon ({problem}); {_DAEMON_HINT}")
    try:
        client = docker.from_env()
        client.ping()
    except (docker.errors.DockerException, OSError) as exc:
        raise DockerUnavailable(f"cannot reach the Docker daemon ({exc}); {_DAEMON_HINT}") from None
    return client


# -- labels and cleanup ----------------------------------------------------------------


def owner_labels(run_id: str, config_name: str) -> dict[str, str]:
    """Labels that say which run, config and process a container belongs to."""
    pid = os.getpid()
    return {
        LABEL: "1",
        LABEL_RUN_ID: run_id,
        LABEL_CONFIG: config_name,
        LABEL_OWNER_PID: str(pid),
        LABEL_OWNER_START: _process_start(pid) or "",
        LABEL_USER: str(os.getuid()),
        LABEL_HOST: socket.gethostname(),
    }


def _process_start(pid: int) -> str | None:
    """Start time of ``pid`` in clock ticks since boot (``/proc/PID/stat`` field 22): tells PID reuse apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()  # the command name may hold spaces
    return fields[19] if len(fields) > 19 else None


def owner_alive(labels: dict[str, str]) -> bool:
    """Whether the process that started a container still runs (same PID, same start time)."""
    try:
        pid = int(labels.get(LABEL_OWNER_PID, ""))
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        pass  # exists, owned by someone else
    start = labels.get(LABEL_OWNER_START)
    return not start or _process_start(pid) in (None, start)


def _mine_filter() -> dict[str, list[str]]:
    """Containers of this user on this host (owner PIDs mean nothing elsewhere)."""
    return {"label": [f"{LABEL}=1", f"{LABEL_USER}={os.getuid()}", f"{LABEL_HOST}={socket.gethostname()}"]}


def _remove(container: Any) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        container.remove(force=True)


def sweep_leftovers(client: DockerClient, *, exclude_run_id: str) -> list[str]:
    """Remove this user's containers (on this host) whose owner process is gone; their names."""
    removed = []
    for container in client.containers.list(all=True, filters=_mine_filter()):
        labels = container.labels or {}
        if labels.get(LABEL_RUN_ID) == exclude_run_id or owner_alive(labels):
            continue
        _remove(container)
        removed.append(str(container.name))
    return removed


def remove_run_containers(client: DockerClient, run_id: str) -> list[str]:
    """Remove every container of run ``run_id`` (e.g. of a SIGKILLed xdist worker); their names."""
    removed = []
    for container in client.containers.list(all=True, filters={"label": [f"{LABEL_RUN_ID}={run_id}"]}):
        _remove(container)
        removed.append(str(container.name))
    return removed


def container_name(run_id: str, config_name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", config_name)
    return f"llamabench-{run_id}-{safe}-{uuid.uuid4().hex[:6]}"
