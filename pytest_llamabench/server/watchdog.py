"""A watchdog that removes a killed process's servers within seconds (testcontainers' "reaper"
idea, without a registry image).

The first server a process starts also starts one small detached watchdog (its own session,
so a Ctrl-C or SIGKILL of the process group does not reach it). It holds the read end of a
pipe whose write end only the watched process has. The watched process writes a line when
it starts a local server (``+ PID START``), when it stopped it (``- PID``) and when it
starts containers of a run (``docker RUN_ID``). When the watched process dies — however, SIGKILL included — the pipe
reaches EOF and the watchdog:

* kills the process group of every local server still registered (checked by its start
  time, so a reused PID is never hit);
* removes the containers labelled with the run id *and* the watched process as owner (an
  xdist worker's watchdog leaves the other workers' containers alone), listing twice a
  second apart for a container whose creation was in flight;

then exits. Under xdist it also watches the controller (``also_watch``): if the controller
dies first, the worker's servers go too. A normal exit closes the pipe as well; then there
is nothing left to clean and the watchdog just exits.

``python -m pytest_llamabench.server.watchdog --owner PID [--also-watch PID:START]``
is how it runs; nothing here imports pytest.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from subprocess import Popen as _Popen  # bound now: a test that fakes subprocess.Popen fakes servers only

_LOCK = threading.Lock()
_WATCHDOG: Watchdog | None = None
_ALSO_WATCH: str | None = None  # PID:START of the xdist controller, in a worker


def process_start(pid: int) -> str | None:
    """Start time of ``pid`` (clock ticks since boot, ``/proc/PID/stat`` field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


class Watchdog:
    """The watched side: the pipe's write end and the watchdog process."""

    def __init__(self, also_watch: str | None = None) -> None:
        read_fd, write_fd = os.pipe()
        cmd = [sys.executable, "-m", "pytest_llamabench.server.watchdog", "--owner", str(os.getpid())]
        if also_watch:
            cmd += ["--also-watch", also_watch]
        try:  # it forks once more and says the daemon's PID: no child of ours lingers as a zombie
            with _Popen(
                cmd, stdin=read_fd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                start_new_session=True, close_fds=True, env={**os.environ, "PYTHONPATH": _import_path()},
            ) as starter:  # fmt: skip
                assert starter.stdout is not None
                self.daemon_pid = int(starter.stdout.readline() or 0)
        finally:
            os.close(read_fd)
        os.set_inheritable(write_fd, False)  # servers and other children must not keep it open
        self._pipe = os.fdopen(write_fd, "w", buffering=1)
        self.pid = os.getpid()
        atexit.register(self.close)

    def send(self, line: str) -> None:
        with contextlib.suppress(OSError, ValueError):
            self._pipe.write(line + "\n")

    def close(self) -> None:
        """A normal exit: the watchdog cleans up what is left, once, and exits."""
        if self.pid == os.getpid():
            self.send("bye")
        with contextlib.suppress(OSError):
            self._pipe.close()


def _import_path() -> str:
    """This package's directory first, so the watchdog imports the same code (e.g. from a checkout)."""
    here = str(Path(__file__).resolve().parents[2])
    rest = os.environ.get("PYTHONPATH")
    return f"{here}{os.pathsep}{rest}" if rest else here


def watchdog() -> Watchdog:
    """This process's watchdog, started on first use (again in a forked child)."""
    global _WATCHDOG
    with _LOCK:
        if _WATCHDOG is None or _WATCHDOG.pid != os.getpid():
            _WATCHDOG = Watchdog(also_watch=_ALSO_WATCH)
        return _WATCHDOG


def watch_controller_too(token: str) -> None:
    """In an xdist worker: its watchdog also cleans up when the controller (``PID:START``) dies."""
    global _ALSO_WATCH
    _ALSO_WATCH = token


def track_process(pid: int) -> None:
    """A local server was started in process group ``pid`` (one already gone is not registered)."""
    if (start := process_start(pid)) is not None:
        watchdog().send(f"+ {pid} {start}")


def untrack_process(pid: int) -> None:
    """That server is stopped and reaped."""
    if _WATCHDOG is not None and _WATCHDOG.pid == os.getpid():
        _WATCHDOG.send(f"- {pid}")


def uses_docker(run_id: str) -> None:
    """Containers of run ``run_id`` owned by this process may exist: remove them when it dies."""
    watchdog().send(f"docker {run_id}")


def controller_token() -> str:
    """``PID:START`` of this process, for workers' watchdogs to watch too."""
    return f"{os.getpid()}:{process_start(os.getpid()) or '-'}"


# -- the watchdog process ----------------------------------------------------------------


def _alive(token: str) -> bool:
    pid_text, _, start = token.partition(":")
    try:
        os.kill(int(pid_text), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return start in ("", "-") or process_start(int(pid_text)) == start


def _kill_groups(groups: dict[int, str]) -> None:
    for pid, start in list(groups.items()):
        if process_start(pid) != start:
            continue  # gone, or the PID is someone else's now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)


def _remove_containers(run_ids: set[str], owner: int, *, passes: int = 3) -> None:
    try:
        from pytest_llamabench.server.docker import LABEL_OWNER_PID, LABEL_RUN_ID, docker_client
    except ImportError:
        return
    try:
        client = docker_client()
    except Exception:  # noqa: BLE001 - no daemon: nothing of ours can be running there
        return
    for attempt in range(passes):  # again a second later: a create that was in flight when the owner died
        for run_id in sorted(run_ids):
            labels = [f"{LABEL_RUN_ID}={run_id}", f"{LABEL_OWNER_PID}={owner}"]
            with contextlib.suppress(Exception):
                for container in client.containers.list(all=True, filters={"label": labels}):
                    with contextlib.suppress(Exception):
                        container.remove(force=True)
        if attempt < passes - 1:
            time.sleep(1.0)
    with contextlib.suppress(Exception):
        client.close()


def run(owner: int, also_watch: str | None, stdin_fd: int = 0) -> None:
    """Read registrations until EOF (or the watched controller died), then clean up."""
    groups: dict[int, str] = {}
    run_ids: set[str] = set()
    clean_exit = False
    buffer = b""
    while True:
        ready, _, _ = select.select([stdin_fd], [], [], 0.5)
        if ready:
            chunk = os.read(stdin_fd, 65536)
            if not chunk:
                break  # the owner is gone (or done)
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                parts = line.decode(errors="replace").split()
                if parts[:1] == ["+"] and len(parts) == 3:
                    groups[int(parts[1])] = parts[2]
                elif parts[:1] == ["-"] and len(parts) == 2:
                    groups.pop(int(parts[1]), None)
                elif parts[:1] == ["docker"] and len(parts) == 2:
                    run_ids.add(parts[1])
                elif parts == ["bye"]:
                    clean_exit = True
        elif also_watch and not _alive(also_watch):
            _kill_groups(groups)  # the controller died: this worker's servers go now
            groups.clear()
            if run_ids:
                _remove_containers(run_ids, owner)
            also_watch = None
    _kill_groups(groups)
    if run_ids:
        _remove_containers(run_ids, owner, passes=1 if clean_exit else 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pytest_llamabench.server.watchdog")
    parser.add_argument("--owner", type=int, required=True)
    parser.add_argument("--also-watch", help="PID:START of another process (an xdist controller)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only EOF ends it
    daemon = os.fork()
    if daemon:  # the starter: say the daemon's PID and exit, so the owner has no child to reap
        print(daemon, flush=True)
        os._exit(0)
    sys.stdout.close()
    os.close(1)
    os.open(os.devnull, os.O_WRONLY)  # fd 1 again, so nothing writes into the starter's closed pipe
    run(args.owner, args.also_watch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
