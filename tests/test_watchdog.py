"""The watchdog (server/watchdog.py): a SIGKILLed owner's process groups are killed within seconds.

Real processes throughout: an owner process registers process groups (``sleep``, standing in
for llama-server: the watchdog only kills process groups, whatever runs in them) and is then
SIGKILLed. The real server and Docker cases are in tests/test_interruptions.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_llamabench.server import watchdog

OWNER = textwrap.dedent("""
    import json, subprocess, sys, time
    from pytest_llamabench.server import watchdog
    if len(sys.argv) > 1:
        watchdog.watch_controller_too(sys.argv[1])
    kept = subprocess.Popen(["sleep", "300"], start_new_session=True)
    done = subprocess.Popen(["sleep", "300"], start_new_session=True)
    watchdog.track_process(kept.pid)
    watchdog.track_process(done.pid)
    watchdog.untrack_process(done.pid)   # stopped by its owner: not the watchdog's business any more
    print(json.dumps({"kept": kept.pid, "done": done.pid, "watchdog": watchdog.watchdog().daemon_pid}), flush=True)
    time.sleep(300)
""")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as fh:  # a zombie is dead
        return fh.read().rpartition(")")[2].split()[0] != "Z"


def gone_within(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def spawned() -> Iterator[list[int]]:
    """PIDs to SIGKILL after the test, whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_owner(*args: str) -> tuple[subprocess.Popen[str], dict[str, int]]:
    proc = subprocess.Popen([sys.executable, "-c", OWNER, *args], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert proc.stdout is not None
    return proc, json.loads(proc.stdout.readline())


def test_a_sigkilled_owner_takes_its_servers_along(spawned: list[int]) -> None:
    owner, pids = start_owner()
    spawned += [owner.pid, *pids.values()]
    assert alive(pids["kept"]) and alive(pids["watchdog"])
    owner.kill()
    owner.wait()
    owner.stdout.close()  # type: ignore[union-attr]
    assert gone_within(pids["kept"], 5), "the registered process group outlived its SIGKILLed owner"
    assert alive(pids["done"]), "an unregistered process was killed"
    assert gone_within(pids["watchdog"], 5), "the watchdog did not exit after cleaning up"


def test_a_worker_watchdog_acts_when_the_controller_dies(spawned: list[int]) -> None:
    controller = subprocess.Popen(["sleep", "300"])
    spawned.append(controller.pid)
    token = f"{controller.pid}:{watchdog.process_start(controller.pid)}"
    owner, pids = start_owner(token)
    spawned += [owner.pid, *pids.values()]
    controller.kill()
    controller.wait()
    assert gone_within(pids["kept"], 5), "the worker's server outlived the killed controller"
    assert alive(owner.pid)  # the worker itself is left to xdist
    owner.kill()
    owner.wait()
    owner.stdout.close()  # type: ignore[union-attr]
    assert gone_within(pids["watchdog"], 5)


def test_a_reused_pid_is_never_killed(spawned: list[int]) -> None:
    """A registration whose start time no longer matches (the PID was reused) is skipped."""
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    spawned.append(other.pid)
    watchdog._kill_groups({other.pid: "1"})  # registered with another start time
    assert alive(other.pid)
    watchdog._kill_groups({other.pid: watchdog.process_start(other.pid) or "-"})
    assert gone_within(other.pid, 5)
    other.wait()
