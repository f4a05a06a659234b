"""pytest -n 2 on the real llama-server and the embedded model, with pytest-benchmark installed
and ``filterwarnings = error``: each config on one worker, each worker on its own cores;
bad -n, --dist and shard values as one usage error; the shards of a split merged."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pytest_llamabench.hardware.placement import physical_cores, split_cpus
from tests.conftest import MATRIX_TEST

Write = Callable[..., Path]
Args = Callable[[Path], list[str]]

#: no threads: each server gets the cores of its worker
TWO_CONFIGS = """
[configs.a]
[configs.b]
ctx = 512
"""


#: The inner run sees one GPU it cannot use (this machine has none): enough to test worker counts,
#: never to measure.
ONE_FAKE_GPU = (
    "from pytest_llamabench.hardware import gpu\n"
    "from pytest_llamabench.hardware.device import Device\n"
    "gpu.discover_devices = lambda environ=None: [Device(0, 'GPU-0000-fake', 'Fake GPU')]\n"
)


@pytest.fixture
def strict_ini(pytester: pytest.Pytester) -> None:
    """This repository's own setting: every warning is an error (pytest-benchmark's too)."""
    pytester.makeini("[pytest]\nfilterwarnings = error\n")
    pytester.makepyfile(MATRIX_TEST)


def no_threads(write_matrix: Write, configs: str) -> Path:
    path = write_matrix(configs)
    path.write_text(path.read_text().replace("threads = 2\n", "", 1))
    return path


def test_two_workers_two_configs_with_pytest_benchmark_and_warnings_as_errors(
    pytester: pytest.Pytester, strict_ini: None, write_matrix: Write, bench_args: Args, tmp_path: Path
) -> None:
    pytest.importorskip("xdist")
    pytest.importorskip("pytest_benchmark")
    result = pytester.runpytest_subprocess(*bench_args(no_threads(write_matrix, TWO_CONFIGS)), "-n", "2")
    assert result.ret == 0, result.stdout.str() + result.stderr.str()
    result.assert_outcomes(passed=4)
    result.stdout.fnmatch_lines(["llamabench: 2 xdist workers, one config at a time each: gw0: cores * physical); gw1: cores *"])
    data = json.loads((tmp_path / "report.json").read_text())
    entries: list[dict[str, Any]] = data["results"]
    assert {(e["config"], e["workload"]) for e in entries} == {(c, w) for c in "ab" for w in ("short", "chat")}
    cores = split_cpus(os.sched_getaffinity(0), 2)
    by_config: dict[str, list[dict[str, Any]]] = {}
    for entry in entries:
        assert entry["outcome"] == "passed", entry
        by_config.setdefault(entry["config"], []).append(entry["server"])
    for config, servers in by_config.items():
        # one server per config: its workloads ran on one worker, against one load of the model
        assert len({s["placement"]["worker"] for s in servers}) == 1, servers
        assert len({s["load_s"] for s in servers}) == 1 and len({s["log"] for s in servers}) == 1, servers
        placement = servers[0]["placement"]
        assert placement["workers"] == 2
        worker_cores = cores[placement["worker"]]
        assert servers[0]["threads"] == len(physical_cores(worker_cores))  # threads = the cores of its share
        assert "--threads" in servers[0]["args"]
    workers = {by_config[c][0]["placement"]["worker"] for c in "ab"}
    assert workers == {0, 1}, "the two configs should run side by side on both workers"


def test_bad_worker_dist_and_shard_values_are_one_usage_error(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args
) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(MATRIX_TEST)
    args = bench_args(write_matrix(TWO_CONFIGS))
    too_many = len(os.sched_getaffinity(0)) + 1
    cases = [
        ((f"-n{too_many}",), f"ERROR: -n {too_many}: {too_many} xdist workers would run {too_many} llama-servers at once"),
        (("-n", "2", "--dist", "worksteal"), "ERROR: --dist worksteal would run one config's workloads on several"),
        (("--llamabench-shard=3/2",), "*argument --llamabench-shard: '3/2' is not a shard; write i/N with 1 <= i <= N*"),
        (("--llamabench-shard=3/3",), "ERROR: --llamabench-shard=3/3: shard 3 of 3 gets no config: the selection has 2 (a, b)*"),
    ]  # fmt: skip
    for extra, line in cases:
        result = pytester.runpytest_subprocess(*args, *extra)
        assert result.ret == pytest.ExitCode.USAGE_ERROR, (extra, result.stdout.str(), result.stderr.str())
        result.stderr.fnmatch_lines([line + ("*" if not line.endswith("*") else "")])
        assert "Traceback" not in result.stderr.str()


def test_more_workers_than_gpus_is_one_usage_error(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args
) -> None:
    """One injected GPU (no GPU here): two workers for a GPU config is refused before any starts."""
    pytest.importorskip("xdist")
    pytester.makepyfile(MATRIX_TEST)
    pytester.makeconftest(ONE_FAKE_GPU)
    result = pytester.runpytest_subprocess(*bench_args(write_matrix("[configs.g]\ngpu = true\n")), "-n", "2")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: -n 2: 2 xdist workers would each need a GPU of their own for the selected "
                                 "GPU configs, but 1 GPU(s) are visible (GPU-0000-fake; *); use -n 1 or fewer*"])  # fmt: skip


def test_shards_of_a_split_run_disjoint_configs_and_merge_into_one_report(
    pytester: pytest.Pytester, write_matrix: Write, bench_args: Args, tmp_path: Path
) -> None:
    pytester.makepyfile(MATRIX_TEST)
    matrix = write_matrix(TWO_CONFIGS + "[configs.c]\nctx = 768\n")
    reports = []
    for index in (1, 2):
        report = tmp_path / f"shard{index}.json"
        result = pytester.runpytest_subprocess(*bench_args(matrix), f"--llamabench-shard={index}/2",
                                               f"--llamabench-json={report}", "--llamabench-workload=short")  # fmt: skip
        assert result.ret == 0, result.stdout.str()
        reports.append(report)
    ran = [{r["config"] for r in json.loads(p.read_text())["results"]} for p in reports]
    assert ran == [{"a", "c"}, {"b"}]  # sorted names dealt round robin
    assert json.loads(reports[0].read_text())["shard"] == {"index": 1, "count": 2, "configs": ["a", "c"]}
    merged = tmp_path / "all.json"
    done = subprocess.run([sys.executable, "-m", "pytest_llamabench", "merge", *map(str, reports), "-o", str(merged)],
                          capture_output=True, text=True, env={**os.environ, "GITHUB_STEP_SUMMARY": ""})  # fmt: skip
    assert done.returncode == 0, done.stderr
    data = json.loads(merged.read_text())
    assert sorted(r["config"] for r in data["results"]) == ["a", "b", "c"] and data["winner"]
    only_one = subprocess.run([sys.executable, "-m", "pytest_llamabench", "merge", str(reports[0]), "-o", str(merged)],
                              capture_output=True, text=True)  # fmt: skip
    assert only_one.returncode == 2 and "shard 2/2 is missing" in only_one.stderr


def test_n_auto_starts_one_worker_per_gpu(pytester: pytest.Pytester, write_matrix: Write, bench_args: Args) -> None:
    """One injected GPU (no GPU here): -n auto starts one worker, not one per core; the GPU test is
    then skipped (NVML finds no usable GPU), before any server starts."""
    pytest.importorskip("xdist")
    pytester.makepyfile(MATRIX_TEST)
    pytester.makeconftest(ONE_FAKE_GPU)
    matrix = write_matrix("[configs.g]\ngpu = true\n")
    result = pytester.runpytest_subprocess(*bench_args(matrix), "-n", "auto", "--llamabench-workload=short")
    result.stdout.fnmatch_lines(["created: 1/1 worker*"])
    result.assert_outcomes(skipped=1)
