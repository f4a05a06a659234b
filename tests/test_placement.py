"""Several GPUs and several machines, without a GPU: device lists are injected.

Placement (a GPU slice and a core slice per xdist worker), ``gpus = 2`` configs, the
grouping of a config's tests on one worker, ``--llamabench-shard`` and ``merge``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pytest_llamabench.bench import Bench, BenchSettings
from pytest_llamabench.config import ServerConfig, load_matrix
from pytest_llamabench.errors import ConfigError, GpuUnavailable
from pytest_llamabench.hardware.device import Device
from pytest_llamabench.hardware.placement import (
    Placement,
    check_workers,
    cpu_list,
    parse_cpu_list,
    physical_cores,
    split_cpus,
    split_devices,
    worker_placement,
)
from pytest_llamabench.plugin.workers import config_group
from pytest_llamabench.results import ResultEntry, RunReport
from pytest_llamabench.shards.merge import merge_reports
from pytest_llamabench.shards.spec import Shard
from pytest_llamabench.stats import Summary

GPUS = [Device(i, f"GPU-{i}{i}{i}{i}-fake", "NVIDIA H200") for i in range(4)]
HEAD = '[models.m]\npath = "m.gguf"\n[defaults]\nmodel = "m"\nctx = 512\n'


def configs(tmp_path: Path, text: str) -> dict[str, ServerConfig]:
    path = tmp_path / "m.toml"
    path.write_text(HEAD + text)
    return dict(load_matrix([path]).configs)


# -- placement -------------------------------------------------------------------------------------


def test_each_worker_gets_its_own_gpus_and_cores() -> None:
    slices = [worker_placement(k, 2, devices=GPUS, cpus=range(32)) for k in range(2)]
    assert [p.devices for p in slices] == [tuple(GPUS[:2]), tuple(GPUS[2:])]
    cpus = [set(p.cpus or ()) for p in slices]  # this host's hyper-thread topology decides the exact split
    assert not cpus[0] & cpus[1] and cpus[0] | cpus[1] == set(range(32)) and all(p.physical_cores for p in slices)
    assert split_cpus(range(32), 2, lambda cpu: {cpu}) == [tuple(range(16)), tuple(range(16, 32))]
    assert split_devices(GPUS[:3], 2) == [(GPUS[0],), (GPUS[1],)]  # the third GPU stays idle
    assert split_cpus([0, 1, 2, 3, 8], 2) == [(0, 1, 2), (3, 8)]
    assert cpu_list([0, 1, 2, 3, 8, 10, 11]) == "0-3,8,10-11" and parse_cpu_list("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    # hyper-threads: CPU n and n+4 are one core; each worker gets whole cores, threads = its cores
    siblings = lambda cpu: {cpu % 4, cpu % 4 + 4}  # noqa: E731
    assert split_cpus(range(8), 2, siblings) == [(0, 1, 4, 5), (2, 3, 6, 7)]
    assert physical_cores([0, 1, 4, 5], siblings) == [(0, 4), (1, 5)]
    alone = worker_placement(0, 1, devices=GPUS[:2], cpus=range(4))
    assert alone.devices == tuple(GPUS[:2]) and alone.cpus is None  # no xdist: nothing is pinned


def test_a_config_gets_the_first_gpus_of_its_slice_and_threads_of_its_cores(tmp_path: Path) -> None:
    found = configs(tmp_path, '[configs.one]\ngpu = true\n[configs.two]\ngpus = 2\nsplit_mode = "layer"\n'
                    'tensor_split = [3, 1]\n[configs.cpu]\n[configs.pinned]\nthreads = 3\n')  # fmt: skip
    assert found["two"].gpu and found["two"].gpus == 2
    assert found["two"].server_args()[-4:] == ["--split-mode", "layer", "--tensor-split", "3,1"]
    place = Placement(0, 1, tuple(GPUS[:2]), (4, 5))
    assert place.devices_for(found["one"]) == (GPUS[0],)  # one GPU, never spread over both
    assert place.devices_for(found["two"]) == tuple(GPUS[:2])
    assert place.devices_for(found["cpu"]) is None
    assert place.with_threads(found["cpu"]).server["threads"] == 2
    assert place.with_threads(found["pinned"]).server["threads"] == 3


def test_a_config_needing_more_gpus_than_its_worker_has_fails_with_the_fix(tmp_path: Path) -> None:
    three = configs(tmp_path, "[configs.big]\ngpus = 3\n")["big"]
    with pytest.raises(GpuUnavailable, match=r"configs\.big\.gpus: config big needs 3 GPUs, but 2 visible .*"
                       r"run it on a host with more GPUs"):  # fmt: skip
        Placement(0, 1, tuple(GPUS[:2])).devices_for(three)
    two = configs(tmp_path, "[configs.pair]\ngpus = 2\n")["pair"]
    with pytest.raises(GpuUnavailable, match=r"xdist worker 2 of 2 has 1 of them .*fewer xdist workers \(-n\)"):
        worker_placement(1, 2, devices=GPUS[:2], cpus=range(4)).devices_for(two)
    bench = Bench(BenchSettings(log_dir=tmp_path, server_bin_candidates=[], placement=Placement(0, 1, tuple(GPUS[:2]))))
    with pytest.raises(GpuUnavailable, match="needs 3 GPUs"), bench.launch(three):
        pass  # refused before any GPU, ballast or server is touched


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("gpus = 0\n", r"configs\.x\.gpus: must be an integer >= 1"),
        ("gpus = 2\ngpu = false\n", r"configs\.x\.gpus: gpus = 2 with gpu = false"),
        ("gpus = 2\ntensor_split = [1, 1, 1]\n", r"configs\.x\.tensor_split: 3 shares for gpus = 2"),
        ('gpus = 2\ntensor_split = "a,b"\n', r"configs\.x\.tensor_split: 'a,b' is not a split"),
        ('split_mode = "rows"\n', r"configs\.x\.split_mode: 'rows' is not one of none, layer, row"),
    ],
)
def test_bad_gpu_keys(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        configs(tmp_path, "[configs.x]\n" + text)


def test_more_workers_than_gpus_or_cores_is_one_error() -> None:
    with pytest.raises(ConfigError, match=r"-n 3: .* 2 GPU\(s\) are visible .*use -n 2 or fewer"):
        check_workers(3, cpus=32, devices=GPUS[:2], gpus_needed=1)
    with pytest.raises(ConfigError, match=r"-n 3: .* may use 2 CPU core\(s\) .*use -n 2 or fewer"):
        check_workers(3, cpus=2, devices=None, gpus_needed=0)
    check_workers(3, cpus=32, devices=GPUS[:2], gpus_needed=0)  # CPU configs only: fine
    check_workers(4, cpus=32, devices=None, gpus_needed=1)  # no GPU found: GPU tests are skipped


def test_a_configs_tests_are_one_scheduling_group() -> None:
    known = ["kv", "kv-q8", "C7", "C7@2"]
    assert config_group("benchmarks/test_matrix.py::test_workload[kv-q8-short]", known) == "kv-q8"
    assert config_group("t.py::test_workload[kv-multi-turn]", known) == "kv"
    assert config_group("t.py::test_workload[C7@2-long]", known) == "C7@2"
    assert config_group("t.py::test_workload[C7-long]@C7", known) == "C7"
    assert config_group("t.py::test_other[x-1]", known) is None
    assert config_group("t.py::test_plain", known) is None


# -- shards and merge --------------------------------------------------------------------------------


def test_shards_split_the_configs_stably_and_completely() -> None:
    names = ["C1", "C2", "C2a", "C2b", "C3", "C4", "C5", "C6", "C7", "C8"]
    shards = [Shard.parse(f"{i}/3").select(names) for i in (1, 2, 3)]
    assert sorted(n for s in shards for n in s) == sorted(names)
    assert shards[0] == ["C1", "C2b", "C5", "C8"]
    assert Shard.parse("2/3").select(list(reversed(names))) == list(reversed(shards[1]))  # order-free
    for bad in ("3/2", "0/2", "1/0", "a/b", "2"):
        with pytest.raises(ConfigError, match=rf"--llamabench-shard: '{bad}' is not a shard; write i/N"):
            Shard.parse(bad)
    with pytest.raises(ConfigError, match=r"shard 3 of 3 gets no config: the selection has 2 \(a, b\); use at most 2"):
        Shard.parse("3/3").select(["b", "a"])


def report(source: str, configs: list[str], *, gpu: str = "NVIDIA H200", build: str = "b1",
           shard: tuple[int, int] | None = None) -> RunReport:  # fmt: skip
    results = [
        ResultEntry(f"{c}-short", c, "short", "passed", metrics={"gen_tok_s": Summary.of([50.0 + i, 51.0 + i])},
                    server={"build_info": build, "threads": 16})  # fmt: skip
        for i, c in enumerate(configs)
    ]
    fp = {"host": {"cpu": "Xeon"}, "gpus": [{"name": gpu}, {"name": gpu}], "llama_cpp_builds": [build]}
    extra = {"shard": Shard(*shard).as_dict(configs)} if shard else {}
    return RunReport(fingerprint=fp, results=results, finished=True, source=source, extra=extra)


def test_merge_joins_shards_and_refuses_what_does_not_belong_together() -> None:
    merged = merge_reports([report("a.json", ["C1", "C3"], shard=(1, 2)), report("b.json", ["C2"], shard=(2, 2))])
    assert [r.config for r in merged.results] == ["C1", "C3", "C2"] and merged.finished
    assert [h["report"] for h in merged.fingerprint["hosts"]] == ["a.json", "b.json"]
    assert "shard" not in merged.extra and merged.extra["merged"]["reports"] == ["a.json", "b.json"]
    with pytest.raises(ConfigError, match=r"GPU models: NVIDIA H200 \(a.json\); NVIDIA H100 \(b.json\).*--allow-mixed"):
        merge_reports([report("a.json", ["C1"]), report("b.json", ["C2"], gpu="NVIDIA H100")])
    with pytest.raises(ConfigError, match=r"llama.cpp builds: b1 \(a.json\); b2 \(b.json\)"):
        merge_reports([report("a.json", ["C1"]), report("b.json", ["C2"], build="b2")])
    mixed = merge_reports([report("a.json", ["C1"]), report("b.json", ["C2"], build="b2")], allow_mixed=True)
    assert mixed.fingerprint["mixed"] == {"llama.cpp builds": {"a.json": "b1", "b.json": "b2"}}
    with pytest.raises(ConfigError, match=r"C1-short is in both a.json and b.json"):
        merge_reports([report("a.json", ["C1"]), report("b.json", ["C1"])])
    with pytest.raises(ConfigError, match=r"shard 2/3 is missing"):
        merge_reports([report("a.json", ["C1"], shard=(1, 3)), report("c.json", ["C3"], shard=(3, 3))])
    with pytest.raises(ConfigError, match=r"shard 1/2 is given twice \(a.json and b.json\)"):
        merge_reports([report("a.json", ["C1"], shard=(1, 2)), report("b.json", ["C2"], shard=(1, 2))])


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest_llamabench", *args], capture_output=True, text=True,
                          env={**os.environ, "GITHUB_STEP_SUMMARY": ""})  # fmt: skip


def test_merge_command_writes_one_report_the_table_and_the_gate_read(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    report("a.json", ["C1", "C3"], shard=(1, 2)).write(a, finished=True)
    report("b.json", ["C2"], shard=(2, 2)).write(b, finished=True)
    out = tmp_path / "all.json"
    done = run_cli("merge", str(a), str(b), "-o", str(out))
    assert done.returncode == 0, done.stderr
    assert "merged 3 results of 2 report(s)" in done.stdout and "C3" in done.stdout
    data = json.loads(out.read_text())
    assert [r["config"] for r in data["results"]] == ["C1", "C3", "C2"] and data["winner"]["best"] == "C3"
    assert "| C2 |" in out.with_suffix(".md").read_text()
    gate = run_cli("compare", str(out), str(out))
    assert gate.returncode == 0, gate.stdout + gate.stderr
    cut = report("b.json", ["C2"], shard=(2, 2))
    cut.interrupted = "Ctrl-C or SIGTERM"
    cut.write(b, finished=False)
    partial = run_cli("merge", str(a), str(b), "-o", str(out))
    data = json.loads(out.read_text())
    assert partial.returncode == 0 and data["finished"] is False and data["winner"]["winner"] is None, partial.stdout
    assert data["interrupted"] == f"{b}: Ctrl-C or SIGTERM"
    refused = run_cli("merge", str(a), str(a), "-o", str(out))
    assert refused.returncode == 2 and "shard 1/2 is given twice" in refused.stderr, refused.stderr


def test_table_shows_vram_per_gpu_and_summed() -> None:
    from pytest_llamabench.metrics import GEN_TOK_S, VRAM_PEAK_MIB
    from pytest_llamabench.outputs.table import build_table, render

    two = ResultEntry("two-short", "two", "short", "passed",
                      metrics={GEN_TOK_S.name: Summary.of([10.0]), VRAM_PEAK_MIB.name: Summary.of([13000.0])},
                      server={"vram": {"peak_by_device": {"GPU-0": 6600.0, "GPU-1": 6400.0}}})  # fmt: skip
    one = ResultEntry("one-short", "one", "short", "passed",
                      metrics={GEN_TOK_S.name: Summary.of([9.0]), VRAM_PEAK_MIB.name: Summary.of([7000.0])},
                      server={"vram": {"peak_by_device": {"GPU-0": 7000.0}}})  # fmt: skip
    rows, workloads, verdict = build_table([two, one])
    text = render(rows, workloads, markdown=True, verdict=verdict)
    assert "| 13000 (6600 + 6400) |" in text and "| 7000 |" in text, text


def test_a_remote_docker_engine_is_one_clear_error_not_a_readiness_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_llamabench.errors import DockerUnavailable
    from pytest_llamabench.server.container import ContainerServer
    from pytest_llamabench.server.docker import remote_engine

    assert remote_engine("ssh://me@gpu1") == "ssh://me@gpu1"
    assert remote_engine("tcp://gpu1:2375") == "tcp://gpu1:2375"
    assert remote_engine("tcp://127.0.0.1:2375") is None and remote_engine("unix:///var/run/docker.sock") is None
    config = configs(tmp_path, '[configs.c]\nimage = "pytest-llamabench/llama-server:local"\n')["c"]
    monkeypatch.setenv("DOCKER_HOST", "ssh://me@gpu1")
    with pytest.raises(DockerUnavailable, match=r"DOCKER_HOST=ssh://me@gpu1: the Docker engine is on another machine"):
        ContainerServer(config, run_id="x", log_dir=tmp_path)._launch(tmp_path / "m.gguf")


def test_a_pinned_worker_pins_its_container_servers_too(tmp_path: Path) -> None:
    from pytest_llamabench.server.container import ContainerServer

    config = configs(tmp_path, '[configs.c]\nimage = "pytest-llamabench/llama-server:local"\n')["c"]
    server = ContainerServer(config, run_id="x", log_dir=tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    before = os.sched_getaffinity(0)
    assert "cpuset_cpus" not in server._create_args(tmp_path / "m.gguf") or len(before) < (os.cpu_count() or 0)
    if len(before) < 2:
        pytest.skip("one core: nothing to partition")
    try:
        os.sched_setaffinity(0, {min(before)})
        assert server._create_args(tmp_path / "m.gguf")["cpuset_cpus"] == str(min(before))
    finally:
        os.sched_setaffinity(0, before)


def test_parallel_vs_serial_flags_what_the_issue_asks_for() -> None:
    """benchmarks/parallel_vs_serial.py on made-up reports: a tok/s ratio outside the start noise,
    VRAM over the budget on one GPU, an OOM in parallel only, workers on one GPU, a slow wall time."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    try:
        from parallel_vs_serial import compare
    finally:
        sys.path.pop(0)

    def run(gens: dict[str, float], minutes: int, gpu_of: dict[str, str], vram: float = 9000.0) -> RunReport:
        results = []
        for worker, (config, gen) in enumerate(gens.items()):
            server = {"placement": {"worker": worker % 2, "workers": 2, "devices": [gpu_of[config]], "cpus": "0-15"},
                      "vram": {"peak_by_device": {gpu_of[config]: vram if config == "C7" else 9000.0}}}  # fmt: skip
            results.append(ResultEntry(f"{config}-short", config, "short", "passed" if gen else "error",
                                       metrics={"gen_tok_s": Summary.of([gen, gen])} if gen else {}, server=server))  # fmt: skip
        return RunReport(fingerprint={"vram_budget_mib": 16384}, results=results, started_at="2026-11-30T08:00:00+00:00",
                         updated_at=f"2026-11-30T08:{minutes:02d}:00+00:00")  # fmt: skip

    one_gpu = {"C5": "GPU-a", "C7": "GPU-b", "C8": "GPU-a"}
    serial = run({"C5": 40.0, "C7": 70.0, "C8": 50.0}, 10, one_gpu)
    good, failures = compare(serial, run({"C5": 38.0, "C7": 72.0, "C8": 51.0}, 5, one_gpu), spread=0.127)
    assert failures == [], failures
    assert "| C7 | 70.0 | 72.0 | 1.03 | yes | 1: GPU-b, 0-15 | 9000 | passed / passed |" in good
    assert "ratio **0.50** (goal ≤ 0.6)" in good
    bad, failures = compare(serial, run({"C5": 30.0, "C7": 70.0, "C8": 0.0}, 8, {c: "GPU-a" for c in one_gpu},
                                        vram=17000.0), spread=0.127)  # fmt: skip
    assert [f.split(":")[0] for f in failures] == ["C5", "C7", "C8", "wall time ratio 0.80 is above the goal 0.6", "workers shared a GPU"]
