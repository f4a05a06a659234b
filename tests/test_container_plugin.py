"""The Docker launcher through the plugin: inner pytest runs with real containers, no mocks.

Each inner run loads a matrix whose container configs set ``image`` to the
locally built tag (tests/test_container.py builds it). The inner session's run
id is recorded by an inner conftest (controller and xdist workers alike), so
every test can look its containers up by the ``pytest-llamabench.run-id`` label
and by the owner-PID label of each inner process, and assert none is left.

Skipped only when the Docker daemon is unreachable; ``LLAMABENCH_REQUIRE_DOCKER=1``
turns that skip into a failure (the ``client`` fixture of tests/test_container.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from pytest_llamabench.server import docker as dk
from pytest_llamabench.server.image import DEFAULT_TAG

from .conftest import MATRIX_TEST
from .test_container import _dead_pid, _parked, client, containers_with_label, image_id  # noqa: F401 - fixtures

REPO = Path(__file__).resolve().parent.parent

Args = Callable[[Path], list[str]]
Write = Callable[..., Path]

#: One tiny workload: an inner run with a container takes a few seconds.
TINY = """
[workloads.w]
prompt_tokens = 16
n_predict = 8
repetitions = 1
warmup = 0
"""

#: Long enough (minutes on 2 cores) that the run is surely mid-request when it is killed.
LONG = """
[workloads.long]
prompt_tokens = 16
n_predict = 6000
repetitions = 1
warmup = 0
"""

BOXED = f'image = "{DEFAULT_TAG}"'


def recorder(sessions: Path) -> str:
    """An inner conftest: each inner process (controller, xdist workers) appends its PID and run id."""
    return f"""
import json, os
from pytest_llamabench.plugin.run import STATE

def pytest_sessionstart(session):
    bench = session.config.stash[STATE]
    line = {{"pid": os.getpid(), "worker": bench.is_worker, "run_id": bench.bench.settings.run_id}}
    with open({str(sessions)!r}, "a") as fh:
        fh.write(json.dumps(line) + "\\n")
"""


@pytest.fixture
def recorded(pytester: pytest.Pytester, tmp_path: Path, client: Any) -> Iterator[Path]:
    """The inner runs' recorder conftest; its file. Afterwards, a safety net: their containers go."""
    path = tmp_path / "sessions.jsonl"
    pytester.makeconftest(recorder(path))
    yield path
    for run_id in {s["run_id"] for s in inner_sessions(path)}:
        dk.remove_run_containers(client, run_id)


#: The matrix test, plus a marker file once the server is up (for the signal tests).
STARTED_TEST = """
import pathlib

def test_workload(llama_server, llama_workload, llamabench):
    pathlib.Path({started!r}).write_text(llama_server.container_name)
    llamabench(llama_server, llama_workload)
"""


def inner_sessions(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_id_of(sessions: list[dict[str, Any]]) -> str:
    """The inner run's id: one for the controller and every worker (XdistHooks passes it on)."""
    run_ids = {s["run_id"] for s in sessions}
    assert len(run_ids) == 1, f"inner processes disagree on the run id: {sessions}"
    return run_ids.pop()


def assert_no_containers(client: Any, sessions: list[dict[str, Any]]) -> None:
    """Nothing labelled with the inner run's id, nor owned by any inner process, is left."""
    run_id = run_id_of(sessions)
    left = [c.name for c in containers_with_label(run_id, client)]
    for s in sessions:
        filters = {"label": [f"{dk.LABEL}=1", f"{dk.LABEL_OWNER_PID}={s['pid']}"]}
        left += [c.name for c in client.containers.list(all=True, filters=filters)]
    assert not left, f"containers outlived the inner run {run_id}: {left}"


def report(tmp_path: Path) -> dict[str, Any]:
    data = json.loads((tmp_path / "report.json").read_text())
    schema = json.loads((REPO / "pytest_llamabench/schema/report.schema.json").read_text())
    jsonschema.validate(data, schema)
    return data


def by_config(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["config"]: r for r in data["results"]}


def gone_within(check: Callable[[], Any], seconds: float) -> bool:
    """Poll ``check`` until falsy or ``seconds`` pass; True when it ended falsy."""
    deadline = time.monotonic() + seconds
    while check() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not check()


def wait_for(what: str, check: Callable[[], Any], proc: subprocess.Popen[str], timeout: float = 120) -> Any:
    """Poll ``check`` until truthy; fail with the inner output if the inner run ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := check():
            return value
        if proc.poll() is not None:
            out, _ = proc.communicate()
            pytest.fail(f"the inner run exited ({proc.returncode}) before {what}:\n{out}")
        time.sleep(0.1)
    proc.kill()
    out, _ = proc.communicate()
    pytest.fail(f"timed out after {timeout:g} s waiting for {what}:\n{out}")


def running_containers(client: Any, sessions_path: Path) -> list[Any]:
    sessions = inner_sessions(sessions_path)
    if not sessions:
        return []
    return [c for c in containers_with_label(sessions[0]["run_id"], client) if c.status == "running"]


#: ``python -m pytest`` that takes Ctrl-C even where this run ignores SIGINT (``cmd &`` in a script).
_PYTEST_WITH_SIGINT = (
    "import signal, sys, pytest; signal.signal(signal.SIGINT, signal.default_int_handler); sys.exit(pytest.main())"
)


def popen_pytest(pytester: pytest.Pytester, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _PYTEST_WITH_SIGINT, *args], cwd=pytester.path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


# -- a container config through the plugin ------------------------------------------------


def test_container_config_reports_like_a_local_one(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path, client: Any, image_id: str,
    recorded: Path,
) -> None:  # fmt: skip
    pytester.makepyfile(MATRIX_TEST)
    matrix = write_matrix(f"[configs.local]\n[configs.boxed]\n{BOXED}\n", workloads=TINY)
    result = pytester.runpytest_subprocess(*bench_args(matrix), timeout=300)
    result.assert_outcomes(passed=2)
    entries = by_config(report(tmp_path))
    local, boxed = entries["local"], entries["boxed"]
    assert local["server"]["launcher"] == "process"
    assert boxed["server"]["launcher"] == "docker"
    assert boxed["server"]["image"] == DEFAULT_TAG
    assert boxed["server"]["image_id"] == image_id
    assert boxed["server"]["image_digest"] == image_id  # built locally: no registry digest
    assert boxed["server"]["args"] == local["server"]["args"]  # same config, same server flags
    assert boxed["server"]["build_info"] == local["server"]["build_info"]  # the same binary, boxed
    assert set(boxed["metrics"]) == set(local["metrics"]), "a container config must report the same metrics"
    assert "rss_peak_mib" in boxed["metrics"]  # from the container's cgroup
    for entry in (local, boxed):
        assert entry["outcome"] == "passed"
        assert entry["metrics"]["gen_tok_s"]["median"] > 0
    run_id = run_id_of(inner_sessions(recorded))
    assert boxed["server"]["container_name"].startswith(f"llamabench-{run_id}-boxed-")
    assert_no_containers(client, inner_sessions(recorded))


def test_container_oom_is_xfail_when_expected_and_an_error_otherwise(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path, client: Any, image_id: str,
    recorded: Path,
) -> None:  # fmt: skip
    """64 MiB limit, the ~94 MB model read into memory (load_mode none): the kernel OOM-kills it."""
    pytester.makepyfile(MATRIX_TEST)
    boxed = f'{BOXED}\nmemory_limit = "64MiB"\nload_mode = "none"\n'
    matrix = write_matrix(f'[configs.expected]\n{boxed}expect = "oom"\n[configs.unexpected]\n{boxed}', workloads=TINY)
    result = pytester.runpytest_subprocess(*bench_args(matrix), timeout=300)
    result.assert_outcomes(xfailed=1, errors=1)
    result.stdout.fnmatch_lines([
        "*ERROR at setup of test_workload[[]unexpected-w[]]*",
        "oom: llama-server (container llamabench-*-unexpected-*) was OOM-killed (exit 137): "
        "the container hit its memory limit (64 MiB, memory_limit in *matrix.toml:configs.unexpected)*",
        "expected/w: xfailed [[]oom[]] llama-server (container llamabench-*-expected-*) was OOM-killed*",
    ])  # fmt: skip
    entries = by_config(report(tmp_path))
    for name, outcome in (("expected", "xfailed"), ("unexpected", "error")):
        entry = entries[name]
        assert entry["outcome"] == outcome, entry
        assert entry["failure"]["kind"] == "oom" and entry["failure"]["detail"]["device"] == "host"
        assert "OOM-killed" in entry["failure"]["message"]
        assert entry["server"]["launcher"] == "docker" and entry["server"]["image_id"] == image_id
    assert_no_containers(client, inner_sessions(recorded))


# -- cleanup when the run is cut short -------------------------------------------------------


@pytest.mark.parametrize("when", ["starting", "mid-workload"])
def test_sigint_removes_the_container(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path, client: Any, image_id: str,
    recorded: Path, when: str,
) -> None:  # fmt: skip
    """Ctrl-C as soon as the container runs (the server is loading or just ready), or mid-request."""
    started = tmp_path / "started"
    pytester.makepyfile(STARTED_TEST.format(started=str(started)))
    matrix = write_matrix(f"[configs.boxed]\n{BOXED}\nctx = 8192\n", workloads=LONG)
    proc = popen_pytest(pytester, *bench_args(matrix))
    try:
        (running,) = wait_for("the container runs", lambda: running_containers(client, recorded), proc, timeout=60)
        if when == "mid-workload":
            wait_for("the workload started", started.exists, proc)
            assert running.name == started.read_text()
            time.sleep(1.0)  # mid-request
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None and not proc.stdout.closed:
            proc.communicate()  # reaps it and closes its pipe, also after a failed assertion
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    assert "KeyboardInterrupt" in out
    assert_no_containers(client, inner_sessions(recorded))


def test_sigkilled_xdist_worker_container_is_removed_by_the_controller(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path, client: Any, image_id: str,
    recorded: Path,
) -> None:  # fmt: skip
    """A SIGKILLed worker runs no cleanup: its container lives on until the controller's finish()."""
    started = tmp_path / "started"
    pytester.makepyfile(STARTED_TEST.format(started=str(started)))
    matrix = write_matrix(f"[configs.boxed]\n{BOXED}\nctx = 8192\n", workloads=LONG)
    proc = popen_pytest(pytester, *bench_args(matrix), "-n", "1")
    try:
        wait_for("the workload started", started.exists, proc)
        (running,) = wait_for("the container runs", lambda: running_containers(client, recorded), proc)
        (worker,) = [s for s in inner_sessions(recorded) if s["worker"]]
        assert running.labels[dk.LABEL_OWNER_PID] == str(worker["pid"])  # the worker started it
        time.sleep(1.0)  # mid-request
        os.kill(worker["pid"], signal.SIGKILL)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None and not proc.stdout.closed:
            proc.communicate()  # reaps it and closes its pipe, also after a failed assertion
    assert proc.returncode == pytest.ExitCode.TESTS_FAILED, out
    assert "worker 'gw0' crashed while running '" in out and "test_workload[boxed-long]'" in out, out
    all_sessions = inner_sessions(recorded)
    assert [s["worker"] for s in all_sessions].count(False) == 1
    assert_no_containers(client, all_sessions)  # controller and every worker (a replacement too) share the run id


def test_sigkilled_session_container_is_removed_within_seconds(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path, client: Any, image_id: str,
    recorded: Path,
) -> None:  # fmt: skip
    """No code of the killed run runs: its watchdog (server/watchdog.py) removes the container.
    (A watchdog killed too is covered by the next session's sweep: the test below.)"""
    started = tmp_path / "started"
    pytester.makepyfile(STARTED_TEST.format(started=str(started)))
    matrix = write_matrix(f"[configs.boxed]\n{BOXED}\nctx = 8192\n", workloads=LONG)
    proc = popen_pytest(pytester, *bench_args(matrix))
    try:
        wait_for("the workload started", started.exists, proc)
        (running,) = wait_for("the container runs", lambda: running_containers(client, recorded), proc)
        proc.kill()  # SIGKILL: no finalizer, no atexit, no sessionfinish
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None and not proc.stdout.closed:
            proc.communicate()  # reaps it and closes its pipe, also after a failed assertion
    (crashed,) = inner_sessions(recorded)
    assert gone_within(lambda: containers_with_label(crashed["run_id"], client), 10), \
        f"{running.name} outlived the killed run by 10 s"  # fmt: skip


def test_sigkilled_xdist_controller_workers_containers_go_too(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path, client: Any, image_id: str,
    recorded: Path,
) -> None:  # fmt: skip
    """The controller is SIGKILLed while a worker's container serves: the worker's watchdog watches
    the controller too and removes it within seconds."""
    started = tmp_path / "started"
    pytester.makepyfile(STARTED_TEST.format(started=str(started)))
    matrix = write_matrix(f"[configs.boxed]\n{BOXED}\nctx = 8192\n", workloads=LONG)
    proc = popen_pytest(pytester, *bench_args(matrix), "-n", "1")
    try:
        wait_for("the workload started", started.exists, proc)
        wait_for("the container runs", lambda: running_containers(client, recorded), proc)
        proc.kill()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        if proc.stdout is not None and not proc.stdout.closed:
            proc.communicate()
    run_id = run_id_of(inner_sessions(recorded))
    assert gone_within(lambda: containers_with_label(run_id, client), 10), \
        "a worker's container outlived the killed controller by 10 s"  # fmt: skip


def test_session_start_sweeps_leftovers_of_a_crashed_run(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path, client: Any, image_id: str,
    recorded: Path,
) -> None:  # fmt: skip
    crashed = uuid.uuid4().hex[:12]
    leftover = _parked(client, image_id, crashed, **{dk.LABEL_OWNER_PID: str(_dead_pid())})
    try:
        pytester.makepyfile(MATRIX_TEST)
        matrix = write_matrix(f"[configs.boxed]\n{BOXED}\n", workloads=TINY)
        result = pytester.runpytest_subprocess(*bench_args(matrix), timeout=300)
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines([
            f"llamabench: removed * container(s) left by an earlier crashed run: *{leftover.name}*",
        ])  # fmt: skip
        assert containers_with_label(crashed, client) == []
        assert_no_containers(client, inner_sessions(recorded))
    finally:
        dk.remove_run_containers(client, crashed)
