"""The plugin end to end: inner pytest runs (pytester) against the real llama-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import MATRIX_TEST

REPO = Path(__file__).resolve().parent.parent

Args = Callable[[Path], list[str]]
Write = Callable[..., Path]


def report(pytester: pytest.Pytester, tmp_path: Path) -> dict:
    return json.loads((tmp_path / "report.json").read_text())


def by_test(data: dict) -> dict[str, dict]:
    return {f"{r['config']}-{r['workload']}": r for r in data["results"]}


def test_collect_only_shows_stable_ids() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert "benchmarks/test_matrix.py::test_workload[base-short]" in out.stdout
    assert "benchmarks/test_matrix.py::test_workload[kv-q8-multi-turn]" in out.stdout
    assert "benchmarks/test_matrix.py::test_workload[oom-ctx-short]" in out.stdout


def test_repo_short_config_option_selects(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q", "-p", "no:cacheprovider",
         "--config=kv-*", "--config=base", "--llamabench-workload=short"],
        cwd=REPO, capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    assert ids == [
        "benchmarks/test_matrix.py::test_workload[kv-q8-short]",
        "benchmarks/test_matrix.py::test_workload[base-short]",
    ]


def test_one_server_per_config_and_gone_after(pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path) -> None:
    matrix = write_matrix("[configs.a]\n[configs.b]\nthreads = 1\n")
    pytester.makepyfile(
        f"""
        import json, pathlib
        SEEN = pathlib.Path({str(tmp_path / "seen.jsonl")!r})

        def test_workload(llama_server, llama_workload, llamabench):
            llamabench(llama_server, llama_workload)
            with SEEN.open("a") as fh:
                fh.write(json.dumps([llama_server.config.name, llama_server.pid, llama_server.base_url]) + "\\n")
        """
    )
    result = pytester.runpytest_subprocess(*bench_args(matrix))
    result.assert_outcomes(passed=4)
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    per_config: dict[str, set[tuple[int, str]]] = {}
    for name, pid, url in seen:
        per_config.setdefault(name, set()).add((pid, url))
    assert {k: len(v) for k, v in per_config.items()} == {"a": 1, "b": 1}  # same PID and port for all workloads
    for (pid, _), in per_config.values():
        assert not Path(f"/proc/{pid}").exists(), f"llama-server {pid} outlived pytest"


def test_report_and_table(pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    matrix = write_matrix(
        """
        [configs.fast]
        [configs.oom]
        ctx = { host_memory_factor = 4 }
        expect = "oom"
        """
    )
    pytester.makepyfile(MATRIX_TEST)
    result = pytester.runpytest_subprocess(*bench_args(matrix))
    result.assert_outcomes(passed=2, xfailed=2)
    result.stdout.fnmatch_lines([
        "*llamabench results*",
        "Config*Short*Chat*RSS (MiB)*VRAM (MiB)*Status*",
        "fast *WINNER*",
        "oom *expected OOM (host * MiB, kv cache)*",
        f"JSON: {tmp_path / 'report.json'}",
    ])  # fmt: skip
    data = report(pytester, tmp_path)
    schema = json.loads((REPO / "pytest_llamabench/schema/report.schema.json").read_text())
    jsonschema.validate(data, schema)
    assert data["finished"] is True
    entries = by_test(data)
    assert set(entries) == {"fast-short", "fast-chat", "oom-short", "oom-chat"}
    short = entries["fast-short"]
    assert short["outcome"] == "passed"
    assert short["metrics"]["gen_tok_s"]["median"] > 0
    assert len(short["metrics"]["gen_tok_s"]["samples"]) == 2
    assert short["server"]["args"][:2] == ["--threads", "2"]
    assert short["model"]["sha256"] and data["fingerprint"]["llama_cpp_builds"]
    oom = entries["oom-short"]
    assert oom["outcome"] == "xfailed" and oom["failure"]["kind"] == "oom"
    assert oom["failure"]["detail"]["device"] == "host" and oom["failure"]["detail"]["requested_mib"] > 20000
    assert "--ctx-size" in oom["server"]["args"]
    assert (tmp_path / "report.md").read_text().count("|") > 10


def test_missing_model_fails_naming_config_and_path(pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path) -> None:
    matrix = write_matrix("[configs.lost]\n", model='path = "nowhere/model.gguf"')
    pytester.makepyfile(MATRIX_TEST)
    result = pytester.runpytest_subprocess(*bench_args(matrix))
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(["*bad-model: *configs.lost (model): model file not found: *nowhere/model.gguf*"])


def test_unknown_config_is_a_usage_error(pytester: pytest.Pytester, write_matrix: Write, bench_args: Args) -> None:
    matrix = write_matrix("[configs.a]\n[configs.b]\n")
    pytester.makepyfile(MATRIX_TEST)
    result = pytester.runpytest_subprocess(*bench_args(matrix), "--llamabench-config=C7")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--llamabench-config: no config matches 'C7'; known configs: a, b*"])
    assert "Traceback" not in result.stderr.str() + result.stdout.str()


def test_malformed_toml_names_file_and_line(pytester: pytest.Pytester, bench_args: Args, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[configs.a]\nthreads = 2\nctx = = 3\n')
    pytester.makepyfile(MATRIX_TEST)
    result = pytester.runpytest_subprocess(*bench_args(bad))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([f"*{bad}: invalid TOML: *line 3*"])


def test_server_bin_option_wins_over_path(pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path) -> None:
    # a decoy llama-server on PATH that only fails (a fault we inject on purpose)
    decoy_dir = tmp_path / "decoy"
    decoy_dir.mkdir()
    decoy = decoy_dir / "llama-server"
    decoy.write_text("#!/bin/sh\necho 'decoy llama-server on PATH' >&2\nexit 3\n")
    decoy.chmod(0o755)
    matrix = write_matrix("[configs.a]\n")
    pytester.makepyfile(MATRIX_TEST)
    env_path = f"{decoy_dir}{os.pathsep}{os.environ['PATH']}"
    pytester._monkeypatch.setenv("PATH", env_path)
    pytester._monkeypatch.delenv("LLAMABENCH_SERVER_BIN", raising=False)
    result = pytester.runpytest_subprocess(*bench_args(matrix), "--llamabench-workload=short")
    result.assert_outcomes(passed=1)
    assert report(pytester, tmp_path)["binary"]["source"] == "--llamabench-server-bin"
    # without the option, PATH's decoy is used: proves the order, and its exit is classified
    args = [a for a in bench_args(matrix) if not a.startswith("--llamabench-server-bin")]
    result = pytester.runpytest_subprocess(*args, "--llamabench-workload=short")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*exited: llama-server exited (exit status 3)*"])


@pytest.mark.parametrize(
    ("configs", "outcomes", "line"),
    [
        pytest.param('[configs.x]\nctx = { host_memory_factor = 4 }\n', {"errors": 2},
                     "*oom: out of memory on the host: kv cache buffer of * MiB*", id="unexpected-oom-fails"),
        pytest.param('[configs.x]\nexpect = "oom"\nargs = ["--no-such-flag"]\n', {"errors": 2},
                     "*unsupported-argument: this llama-server build does not accept '--no-such-flag'*",
                     id="bad-flag-is-not-oom"),
        pytest.param('[configs.x]\nexpect = "oom"\n', {"failed": 2}, "*XPASS(strict)*expected OOM*",
                     id="expected-oom-that-fits-fails"),
        pytest.param('[configs.x]\nready_timeout_s = 0.05\n', {"errors": 2},
                     "*not-ready: x: llama-server was not ready within 0.05 s*", id="not-ready"),
    ],
)  # fmt: skip
def test_failures_are_classified(pytester: pytest.Pytester, write_matrix: Write, bench_args: Args,
                                 configs: str, outcomes: dict[str, int], line: str) -> None:  # fmt: skip
    pytester.makepyfile(MATRIX_TEST)
    result = pytester.runpytest_subprocess(*bench_args(write_matrix(configs)))
    result.assert_outcomes(**outcomes)
    result.stdout.fnmatch_lines([line])


@pytest.mark.parametrize("damage", ["truncated", "not-gguf"])
def test_bad_model_file_is_caught_before_launch(pytester: pytest.Pytester, write_matrix: Write, bench_args: Args,
                                                model_path: Path, tmp_path: Path, damage: str) -> None:  # fmt: skip
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(model_path.read_bytes()[: 3_000_000] if damage == "truncated" else b"<html>404</html>" * 64)
    pytester.makepyfile(MATRIX_TEST)
    result = pytester.runpytest_subprocess(*bench_args(write_matrix("[configs.x]\n", model=f'path = "{bad}"')))
    result.assert_outcomes(errors=2)
    expected = "*bad-model: *is truncated*" if damage == "truncated" else "*bad-model: *is not a GGUF file*"
    result.stdout.fnmatch_lines([expected])
    assert not (tmp_path / "logs" / "x.log").exists(), "the server must not be launched"


def test_server_killed_mid_workload_is_server_died(pytester: pytest.Pytester, write_matrix: Write, bench_args: Args) -> None:
    matrix = write_matrix(
        "[configs.x]\n",
        workloads="[workloads.long]\nprompt_tokens = 16\nn_predict = 4000\nrepetitions = 1\nwarmup = 0\n"
        "[workloads.next]\nprompt_tokens = 16\nn_predict = 4\nrepetitions = 1\nwarmup = 0\n",
    )
    pytester.makepyfile(
        """
        import os, signal, threading, time

        def test_workload(llama_server, llama_workload, llamabench):
            if llama_workload.name == "long":
                threading.Timer(1.5, os.kill, (llama_server.pid, signal.SIGKILL)).start()
            llamabench(llama_server, llama_workload)
        """
    )
    result = pytester.runpytest_subprocess(*bench_args(matrix))
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines([
        "x/long: failed [[]server-died[]] x: llama-server died during the workload: *SIGKILL*",
        # the next workload of that config says the server is dead, not a connection error
        "x/next: failed [[]server-died[]] x: llama-server died during an earlier workload: *SIGKILL*",
    ])  # fmt: skip
    assert "ConnectError" not in result.stdout.str()


def test_thresholds_fail_readably_and_pass_below(pytester: pytest.Pytester, write_matrix: Write, bench_args: Args) -> None:
    matrix = write_matrix(
        """
        [configs.impossible]
        thresholds = { min_gen_tok_s = 1000000 }
        [configs.easy]
        thresholds = { min_gen_tok_s = 0.01, max_ttft_ms = 600000 }
        """
    )
    pytester.makepyfile(
        MATRIX_TEST
        + """
import pytest

@pytest.mark.llamabench_thresholds(max_ttft_ms=0.001)
def test_marker(llama_server, llama_workload, llamabench):
    llamabench(llama_server, llama_workload)
"""
    )
    result = pytester.runpytest_subprocess(*bench_args(matrix), "--llamabench-workload=short")
    result.assert_outcomes(passed=1, failed=3)
    result.stdout.fnmatch_lines([
        "*threshold: impossible/short: threshold not met: gen_tok_s median * tok/s, required "
        "min_gen_tok_s = 1e+06 tok/s (set in *matrix.toml:configs.impossible.thresholds)*",
        "*threshold: easy/short: threshold not met: ttft_ms median * ms, required max_ttft_ms = 0.001 ms "
        "(set in *llamabench_thresholds on *test_marker*",
    ])  # fmt: skip


def test_sigint_leaves_a_valid_report(pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path) -> None:
    matrix = write_matrix(
        "[configs.a]\nctx = 1031\n[configs.b]\nctx = 1031\n",
        workloads="[workloads.w]\nprompt_tokens = 16\nn_predict = 8\nrepetitions = 1\nwarmup = 0\n"
        "[workloads.slow]\nprompt_tokens = 16\nn_predict = 3000\nrepetitions = 1\nwarmup = 0\n",
    )
    pytester.makepyfile(MATRIX_TEST)
    report_path = tmp_path / "report.json"
    with subprocess.Popen(
        [sys.executable, "-m", "pytest", *bench_args(matrix)], cwd=pytester.path,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # even if our SIGINT is ignored
    ) as proc:  # fmt: skip
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline:  # wait until the first test is recorded, then interrupt
                if report_path.exists() and json.loads(report_path.read_text())["results"]:
                    break
                time.sleep(0.2)
            time.sleep(1.0)
            proc.send_signal(signal.SIGINT)
            out, _ = proc.communicate(timeout=180)
        finally:
            proc.kill()
    assert proc.returncode == pytest.ExitCode.INTERRUPTED, out
    data = json.loads(report_path.read_text())
    assert data["finished"] is False and data["interrupted"], "an interrupted run must not look finished"
    done = [r for r in data["results"] if r["outcome"] == "passed"]
    assert done and all(r["metrics"]["gen_tok_s"]["n"] == 1 for r in done)
    assert data["winner"]["winner"] is None and "partial run" in data["winner"]["line"]
    assert "no winner from a partial run: interrupted" in out and " of 4 results" in out
    leftovers = subprocess.run(["pgrep", "-f", "llama-server.*--ctx-size 1031"], capture_output=True, text=True)
    assert leftovers.stdout == "", f"llama-server outlived the interrupted run: {leftovers.stdout}"


def test_a_hanging_server_times_out_naming_the_key_to_raise(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args
) -> None:
    # a real hang: the real server is stopped (SIGSTOP) while the request waits for it
    matrix = write_matrix(
        "[configs.x]\n",
        workloads="[workloads.w]\nprompt_tokens = 8\nn_predict = 4\nrepetitions = 1\nwarmup = 0\ntimeout_s = 2\n",
    )
    pytester.makepyfile(
        """
        import os, signal

        def test_workload(llama_server, llama_workload, llamabench):
            os.kill(llama_server.pid, signal.SIGSTOP)
            try:
                llamabench(llama_server, llama_workload)
            finally:
                os.kill(llama_server.pid, signal.SIGCONT)
        """
    )
    started = time.monotonic()
    result = pytester.runpytest_subprocess(*bench_args(matrix))
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*request-failed: POST /*: the server sent nothing for 2 s (ReadTimeout); "
                                 "raise timeout_s in *matrix.toml:workloads.w (or pass --llamabench-request-timeout)*"])  # fmt: skip
    assert time.monotonic() - started < 60


def test_an_earlier_report_and_log_are_never_taken_for_this_runs(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path
) -> None:
    old = tmp_path / "report.json"
    old.write_text(json.dumps({"schema_version": 1, "finished": True, "started_at": "2020-01-01", "results": []}))
    (tmp_path / "logs").mkdir()
    stale = tmp_path / "logs" / "x.log"
    stale.write_text("A LOG OF AN EARLIER RUN\n")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    matrix = write_matrix("[configs.x]\n")
    pytester.makepyfile(MATRIX_TEST)
    args = [a for a in bench_args(matrix) if not a.startswith("--llamabench-server-bin")]
    result = pytester.runpytest_subprocess(*args, "--llamabench-server-bin=/nonexistent/llama-server")
    result.assert_outcomes(errors=2)  # both workloads of x: no llama-server to start
    assert "A LOG OF AN EARLIER RUN" not in result.stdout.str()
    assert json.loads((tmp_path / "report.previous.json").read_text())["started_at"] == "2020-01-01"
    report = json.loads(old.read_text())
    assert report["started_at"] != "2020-01-01" and report["results"][0]["outcome"] == "error"


def test_a_busy_host_is_flagged_not_blamed_on_the_server(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path
) -> None:
    # a real neighbour: another process spinning on one core while a 1-thread server is measured
    matrix = write_matrix("[configs.x]\nthreads = 1\nthresholds = { min_gen_tok_s = 1000000 }\n")
    pytester.makepyfile(MATRIX_TEST)
    args = [a for a in bench_args(matrix) if not a.startswith("--llamabench-busy-cores")]
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        result = pytester.runpytest_subprocess(*args, "--llamabench-workload=short")
    finally:
        spinner.kill()
        spinner.wait()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines([
        "*threshold not met: gen_tok_s median * (set in *); measured while the host was busy (other processes "
        "used * of * cores), so this says nothing about llama-server*--llamabench-retry-busy*",
        "x *busy host: not ranked*",
    ])  # fmt: skip
    entry = json.loads((tmp_path / "report.json").read_text())["results"][0]
    assert entry["host_load"]["busy"] and entry["host_load"]["other_cores"] > 0.5, entry["host_load"]


def test_gpu_configs_skip_with_a_reason_or_fail_when_required(pytester: pytest.Pytester, write_matrix: Write, bench_args: Args) -> None:
    from pytest_llamabench.hardware.gpu import probe_gpu

    if probe_gpu().available:
        pytest.skip("this machine has a GPU: the no-GPU paths are exercised where there is none (CI)")
    matrix = write_matrix("[configs.g]\ngpu = true\n[configs.c]\n")
    pytester.makepyfile(MATRIX_TEST)
    result = pytester.runpytest_subprocess(*bench_args(matrix), "-m", "gpu", "-rs")
    result.assert_outcomes(skipped=2)
    result.stdout.fnmatch_lines(["*no usable NVIDIA GPU: NVML library not found*"])
    result = pytester.runpytest_subprocess(*bench_args(matrix), "-m", "gpu", "--llamabench-require-gpu")
    result.assert_outcomes(errors=2)  # failed in setup, before any server starts
    result.stdout.fnmatch_lines(["*--llamabench-require-gpu is set*"])


@pytest.mark.parametrize("where", ["LLAMABENCH_API_KEY", "LLAMA_API_KEY", "args"])
def test_api_key_is_used_and_never_reported(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path, where: str
) -> None:
    secret = "sk-llamabench-test-4f1c9e"
    config = f'[configs.k]\nargs = ["--api-key", "{secret}"]\n' if where == "args" else "[configs.k]\n"
    matrix = write_matrix(config, workloads="[workloads.w]\nprompt_tokens = 8\nn_predict = 4\nrepetitions = 1\nwarmup = 0\n")
    pytester.makepyfile(
        """
        import httpx

        def test_workload(llama_server, llama_workload, llamabench):
            assert httpx.post(llama_server.base_url + "/completion", json={"prompt": "x", "n_predict": 1}).status_code == 401
            llamabench(llama_server, llama_workload)
        """
    )
    if where != "args":
        pytester._monkeypatch.setenv(where, secret)
    result = pytester.runpytest_subprocess(*bench_args(matrix))
    result.assert_outcomes(passed=1)
    for path in [tmp_path / "report.json", tmp_path / "report.md", *(tmp_path / "logs").iterdir()]:
        assert secret not in path.read_text(), path
    assert secret not in result.stdout.str()
