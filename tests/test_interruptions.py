"""Interrupted runs with a real local server (benchmarks/interruptions.py does this at random
points, many times, local and Docker): nothing is left, and the report says it did not finish."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from .test_container_plugin import LONG, TINY, Args, Write, gone_within, popen_pytest, report, wait_for

#: The matrix test, plus the server's PID and URL once the long workload (the second) starts.
STARTED_TEST = """
import json, pathlib

def test_workload(llama_server, llama_workload, llamabench):
    if llama_workload.name == "long":
        pathlib.Path({started!r}).write_text(json.dumps({{"pid": llama_server.pid, "url": llama_server.base_url}}))
    llamabench(llama_server, llama_workload)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] != "Z"
    except (ProcessLookupError, FileNotFoundError):
        return False


def _listening(url: str) -> bool:
    host, _, port = url.removeprefix("http://").partition(":")
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, int(port))) == 0


def _watchdogs_of(owner: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"pytest_llamabench.server.watchdog" in cmd and str(owner).encode() in cmd and _alive(int(entry.name)):
                found.append(int(entry.name))
    return found


def _interrupt_mid_workload(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path, sig: signal.Signals
) -> tuple[subprocess.Popen[str], str, dict[str, Any]]:
    started = tmp_path / "started"
    pytester.makepyfile(STARTED_TEST.format(started=str(started)))
    matrix = write_matrix("[configs.x]\n", workloads=TINY + LONG)  # one result, then the interrupted one
    proc = popen_pytest(pytester, *bench_args(matrix))
    try:
        wait_for("the workload started", started.exists, proc)
        server = json.loads(started.read_text())
        time.sleep(1.0)  # mid-request
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None and not proc.stdout.closed:
            proc.communicate()
    return proc, out, server


def test_sigkill_mid_workload_leaves_no_server_port_or_watchdog(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path
) -> None:
    proc, _, server = _interrupt_mid_workload(pytester, write_matrix, bench_args, tmp_path, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL
    assert gone_within(lambda: _alive(server["pid"]), 10), "llama-server outlived the SIGKILLed pytest"
    assert gone_within(lambda: _listening(server["url"]), 10), f"{server['url']} still listens"
    assert gone_within(lambda: _watchdogs_of(proc.pid), 10), "the watchdog did not exit"
    assert report(tmp_path)["finished"] is False  # written with the first workload's result, never finished


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_or_sigterm_mid_workload_stops_cleanly_and_says_so(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path, sig: signal.Signals
) -> None:
    proc, out, server = _interrupt_mid_workload(pytester, write_matrix, bench_args, tmp_path, sig)
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert not _alive(server["pid"]) and not _listening(server["url"])  # gone before pytest exited
    data = report(tmp_path)
    assert data["finished"] is False and data["interrupted"], data.get("interrupted")
    assert [r["outcome"] for r in data["results"] if r["workload"] == "w"] == ["passed"]
    assert gone_within(lambda: _watchdogs_of(proc.pid), 10)
