"""Progress lines, the HTML report and the production config from inner pytest runs against the
real llama-server; the production command line is then started for real."""

from __future__ import annotations

import json
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from .conftest import MATRIX_TEST

Args = Callable[[Path], list[str]]
Write = Callable[..., Path]


def _without_html_off(args: list[str]) -> list[str]:
    return [a for a in args if a != "--llamabench-html=off"]  # the plugin's default: the page next to the JSON


def test_a_run_writes_the_page_the_charts_and_the_production_config(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path
) -> None:
    matrix = write_matrix('[configs.solo]\ndescription = "2 threads"\n')
    pytester.makepyfile(MATRIX_TEST)
    result = pytester.runpytest_subprocess(*_without_html_off(bench_args(matrix)))
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    result.stdout.fnmatch_lines([
        "[[]llamabench[]] solo: server ready in *.* s",
        "[[]llamabench[]] [[]1/2[]] solo/short passed · *.* tok/s · * s · ETA *",
        "[[]llamabench[]] [[]2/2[]] solo/chat passed · *.* tok/s · * s",
        "*llamabench results*",
        "WINNER: solo (the only config that passed)",
        "production config (solo): * --model * --host 127.0.0.1 --port 8080 --threads 2 *",
        "  generation tok/s (median): short *, chat *; mean *",
        f"HTML: {tmp_path / 'report.html'}",
    ])  # fmt: skip
    assert "\r" not in out and "\x1b[" not in out  # not a terminal: plain lines, no cursor movement
    data = json.loads((tmp_path / "report.json").read_text())
    production = data["winner"]["production"]
    args = next(r["server"]["args"] for r in data["results"] if r["workload"] == "short")
    assert production["argv"][7:] == args
    assert production["rationale"]["gen_tok_s"]["short"] > 0
    page = (tmp_path / "report.html").read_text()
    assert page.count("<svg") >= 3 and "Production config: solo" in page
    markdown = (tmp_path / "report.md").read_text()
    assert "**Production config: solo**" in markdown
    assert "![Generation tok/s per config and workload](report-charts/tok_s.png)" in markdown
    assert (tmp_path / "report-charts" / "tok_s.png").read_bytes().startswith(b"\x89PNG")
    _serves(production["argv"])


def _serves(argv: list[str]) -> None:
    """The production command line starts a llama-server that answers (on a free port, not 8080)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    argv = [str(port) if i and argv[i - 1] == "--port" else a for i, a in enumerate(argv)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"the production command exited with {proc.returncode}: {argv}"
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the production command's server was not ready in 60 s"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_progress_under_xdist_comes_from_the_controller(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args
) -> None:
    pytest.importorskip("xdist")
    matrix = write_matrix("[configs.a]\n[configs.b]\nthreads = 1\n")
    pytester.makepyfile(MATRIX_TEST)
    result = pytester.runpytest_subprocess(*bench_args(matrix), "-n", "2", "-q")
    result.assert_outcomes(passed=4)
    lines = [line for line in result.stdout.lines if line.startswith("[llamabench] [")]
    assert len(lines) == 4 and all("/4] " in line for line in lines), result.stdout.str()
    assert sorted(line.split("] ", 2)[2].split(" ")[0] for line in lines) == ["a/chat", "a/short", "b/chat", "b/short"]
    ready = sorted(line.split(":")[0] for line in result.stdout.lines if " server ready in " in line)
    assert ready == ["[llamabench] a", "[llamabench] b"]  # from the workers' reports, in either order


@pytest.mark.parametrize("flag", ["-qq", "--llamabench-progress=off"])
def test_progress_can_be_silenced(pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, flag: str) -> None:
    matrix = write_matrix("[configs.a]\n", workloads=_ONE_WORKLOAD)
    pytester.makepyfile(MATRIX_TEST)
    result = pytester.runpytest_subprocess(*bench_args(matrix), flag)
    assert result.ret == 0, result.stdout.str()  # (-qq prints no summary line to count outcomes from)
    assert "server ready" not in result.stdout.str() and "[1/1]" not in result.stdout.str()


def test_html_off_writes_no_page(pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path) -> None:
    matrix = write_matrix("[configs.a]\n", workloads=_ONE_WORKLOAD)
    pytester.makepyfile(MATRIX_TEST)
    pytester.runpytest_subprocess(*bench_args(matrix), "--llamabench-html=off").assert_outcomes(passed=1)
    assert (tmp_path / "report.json").exists() and not (tmp_path / "report.html").exists()
    assert not (tmp_path / "report-charts").exists()


_ONE_WORKLOAD = """
[workloads.short]
prompt_tokens = 16
n_predict = 8
repetitions = 3
warmup = 1
"""


def test_on_a_terminal_the_repetition_status_is_shown_then_erased(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path
) -> None:
    matrix = write_matrix("[configs.a]\n", workloads=_ONE_WORKLOAD)
    (tmp_path / "test_tty.py").write_text(MATRIX_TEST)
    argv = [sys.executable, "-m", "pytest", str(tmp_path / "test_tty.py"), *bench_args(matrix), "-p", "no:xdist",
            "--rootdir", str(tmp_path)]  # fmt: skip
    main, child = pty.openpty()
    proc = subprocess.Popen(argv, stdin=child, stdout=child, stderr=child, cwd=tmp_path, close_fds=True,
                            env={**os.environ, "COLUMNS": "200", "TERM": "xterm"})  # fmt: skip
    os.close(child)
    output = b""
    try:
        while True:
            ready, _, _ = select.select([main], [], [], 120)
            if not ready:
                break
            try:
                chunk = os.read(main, 65536)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
    finally:
        proc.wait(timeout=120)
        os.close(main)
    text = output.decode(errors="replace")
    assert proc.returncode == 0, text
    assert "a/short: warm-up 1/1" in text and "a/short: repetition 3/3" in text  # the live status
    status = text.index("a/short: repetition 3/3")
    erase = text.index("\x1b[K", status)  # erased (cursor back, clear to the end of the line) ...
    assert erase < text.index("[llamabench] [1/1] a/short passed")  # ... before the test's own line
