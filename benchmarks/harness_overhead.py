"""Benchmark of the harness itself (issue: the spine, part 2, item 7).

1. The plugin's client-side generation tok/s vs llama-server's own ``timings``
   (same n - 1 tokens; goal: within 1 %).
2. llama-server vs ``llama-bench`` tg for the same model and threads
   (llama.cpp's engine-vs-server gap: reported, not hidden).
3. The harness's own CPU use while streaming (process CPU time / wall time).
4. A small matrix through pytest: total wall time vs the sum of model loads and
   measured requests (goal <= 1.15: one load per config, little overhead).
5. Concurrent load (issue 17): N streams at once through the async client (default 8, the
   ``np8`` config of configs/concurrency.toml): the harness's process CPU time over the wall
   time, next to the server's, and each request's client tok/s against the server's
   ``timings.predicted_per_second`` (same n - 1 tokens).

    python benchmarks/harness_overhead.py [--json out.json]
    python benchmarks/harness_overhead.py --only-load [--streams 8] [--json out.json]
    python benchmarks/harness_overhead.py --only-load --load-matrix configs/concurrency-gpu.toml \
        --load-config np16 --streams 16 --n-predict 256 --json gpu-overhead.json     # on the GPU
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pytest_llamabench.server.build import BuildSpec, cached_binary, resolve_server_bin
from pytest_llamabench.config import Workload, load_matrix
from pytest_llamabench.config_load import LoadLevel
from pytest_llamabench.hardware.host import host_fingerprint, process_cpu_seconds
from pytest_llamabench.measure.load import LoadSample
from pytest_llamabench.server.launcher import LocalServer
from pytest_llamabench.model.files import embedded_model_path
from pytest_llamabench.measure.workload import run_workload
from pytest_llamabench.metrics import CLIENT_GEN_TOK_S, GEN_TOK_S
from pytest_llamabench.stats import percentile

REPO = Path(__file__).resolve().parent.parent


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def client_vs_server(binary: Path, n_predict: int, reps: int) -> dict[str, Any]:
    matrix = load_matrix([REPO / "configs/full.toml"])
    workload = Workload("bench", prompt_tokens=32, n_predict=n_predict, repetitions=reps, warmup=1)
    with tempfile.TemporaryDirectory() as logs, LocalServer(matrix.configs["base"], binary=binary, log_dir=Path(logs)) as server:
        wall0, cpu0 = time.perf_counter(), cpu_seconds()
        measurement = run_workload(server, workload)
        wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    metrics = measurement.metrics()
    by_server, by_client = metrics[GEN_TOK_S.name], metrics[CLIENT_GEN_TOK_S.name]
    server_tps, client_tps = by_server.median, by_client.median
    diffs = [abs(c - s) / s * 100 for c, s in zip(by_client.samples, by_server.samples)]
    return {
        "server_gen_tok_s": server_tps,
        "client_gen_tok_s": client_tps,
        "client_vs_server_pct_median": statistics.median(diffs),
        "client_vs_server_pct_max": max(diffs),
        "harness_cpu_pct_of_one_core": cpu / wall * 100,
        "wall_s": wall,
    }


def concurrent_overhead(binary: Path, matrix_path: Path, config_name: str, streams: int, n_predict: int,
                        reps: int) -> dict[str, Any]:  # fmt: skip
    """``streams`` closed-loop streams, 4 requests each, per repetition: the harness's CPU and timing error."""
    matrix = load_matrix([matrix_path])
    config = matrix.configs[config_name]
    level = LoadLevel("overhead", concurrency=streams, requests=4 * streams)
    workload = Workload(f"overhead-c{streams}", kind="load", prompt_tokens=64, n_predict=n_predict,
                        repetitions=reps, warmup=1, load=level)  # fmt: skip
    with tempfile.TemporaryDirectory() as logs, LocalServer(config, binary=binary, log_dir=Path(logs)) as server:
        server_cpu0 = sum(process_cpu_seconds(pid) for pid in server.pids())
        wall0, cpu0 = time.perf_counter(), cpu_seconds()
        measurement = run_workload(server, workload)
        wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
        server_cpu = sum(process_cpu_seconds(pid) for pid in server.pids()) - server_cpu0
    rows = [row for s in measurement.samples if isinstance(s, LoadSample) for row in s.requests]
    diffs = [abs(r["client_gen_tok_s"] - r["gen_tok_s"]) / r["gen_tok_s"] * 100 for r in rows if r["gen_tok_s"] > 0]
    agg = measurement.metrics()["agg_tok_s"]
    where = host_fingerprint().get("cpu")
    if config.gpu:
        from pytest_llamabench.hardware.gpu import snapshot_gpus

        where = next((g.as_dict().get("name") for g in snapshot_gpus()), None) or where
    return {
        "device": where, "config": config_name, "matrix": str(matrix_path), "streams": streams, "requests": len(rows),
        "n_predict": n_predict, "wall_s": wall, "agg_tok_s_median": agg.median,
        "harness_cpu_s": cpu, "harness_cores": cpu / wall, "server_cpu_s": server_cpu, "server_cores": server_cpu / wall,
        "harness_share_of_cpu_pct": cpu / (cpu + server_cpu) * 100 if cpu + server_cpu > 0 else None,
        # the CPU time covers the warmup repetition too: so do the tokens it is divided by
        "harness_cpu_ms_per_token": cpu * 1000 / (n_predict * level.requests * (workload.warmup + reps)),
        "repetitions": reps, "warmup": workload.warmup,
        "client_vs_server_pct_median": statistics.median(diffs) if diffs else None,
        "client_vs_server_pct_p90": percentile(diffs, 90) if diffs else None,
        "client_vs_server_pct_max": max(diffs) if diffs else None,
        "warmups_included": "harness/server CPU and wall include the warmup repetition",
    }  # fmt: skip


def llama_bench(binary_dir: Path, n_predict: int, reps: int) -> float | None:
    bench = binary_dir / "llama-bench"
    if not bench.exists():
        return None
    out = subprocess.run(
        [str(bench), "-m", str(embedded_model_path("smollm2-135m-instruct-q4_1")), "-p", "0", "-n", str(n_predict),
         "-t", "2", "-r", str(reps), "-o", "json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    rows = json.loads(out.stdout)
    return float(rows[0]["avg_ts"])


def matrix_efficiency(binary: Path) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pytest", "benchmarks/test_matrix.py", "-q", "-p", "no:randomly",
               "--config=base", "--config=kv-q8", "--config=threads-1", "--llamabench-workload=short",
               "--llamabench-workload=medium", f"--llamabench-server-bin={binary}", f"--llamabench-json={report}",
               "--benchmark-disable"]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        wall = time.perf_counter() - start
        data = json.loads(report.read_text())
    loads = {r["config"]: r["server"]["load_s"] for r in data["results"]}
    requests = 0.0
    for r in data["results"]:
        spec, e2e = r["workload_spec"], r["metrics"]["e2e_ms"]
        requests += sum(e2e["samples"]) / 1000 * (spec["repetitions"] + spec["warmup"]) / spec["repetitions"]
    useful = sum(loads.values()) + requests
    return {"wall_s": wall, "loads_s": sum(loads.values()), "requests_s": requests, "ratio": wall / useful,
            "configs": len(loads), "tests": len(data["results"])}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-predict", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--only-load", action="store_true", help="only part 5, concurrent load")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument("--load-matrix", type=Path, default=REPO / "configs/concurrency.toml")
    parser.add_argument("--load-config", default="np8")
    args = parser.parse_args()
    binary, _ = resolve_server_bin(
        [(os.environ.get("LLAMABENCH_SERVER_BIN"), "LLAMABENCH_SERVER_BIN")], spec=BuildSpec(), build_if_missing=True, log=print
    )
    results: dict[str, Any] = {"cpu": os.cpu_count(), "binary": str(binary)}
    results["concurrent"] = concurrent_overhead(binary, args.load_matrix, args.load_config, args.streams,
                                                args.n_predict, args.reps)  # fmt: skip
    c = results["concurrent"]
    print(f"{c['streams']} streams ({c['config']}): {c['requests']} requests, {c['agg_tok_s_median']:.1f} aggregate tok/s")
    print(f"  harness CPU {c['harness_cores']:.3f} cores ({c['harness_cpu_ms_per_token']:.3f} ms per token), "
          f"server {c['server_cores']:.2f} cores: harness {c['harness_share_of_cpu_pct']:.1f}% of the CPU time")  # fmt: skip
    print(f"  client vs server tok/s per request: median {c['client_vs_server_pct_median']:.2f}%, "
          f"p90 {c['client_vs_server_pct_p90']:.2f}%, max {c['client_vs_server_pct_max']:.2f}%")  # fmt: skip
    if args.only_load:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        return 0
    results["client_vs_server"] = client_vs_server(binary, args.n_predict, args.reps)
    bin_dir = cached_binary(BuildSpec())
    results["llama_bench_tg_tok_s"] = llama_bench((bin_dir or binary).parent, args.n_predict, args.reps)
    results["matrix"] = matrix_efficiency(binary)
    cs, tg = results["client_vs_server"], results["llama_bench_tg_tok_s"]
    print(f"server timings gen tok/s (median)      {cs['server_gen_tok_s']:.1f}")
    print(f"plugin client gen tok/s (median)       {cs['client_gen_tok_s']:.1f}")
    print(f"client vs server, per run (median/max) {cs['client_vs_server_pct_median']:.2f}% / {cs['client_vs_server_pct_max']:.2f}%  (goal < 1%)")
    if tg:
        print(f"llama-bench tg{args.n_predict} tok/s                 {tg:.1f}  (server/engine = {cs['server_gen_tok_s'] / tg:.3f})")
    print(f"harness CPU while streaming            {cs['harness_cpu_pct_of_one_core']:.1f}% of one core")
    m = results["matrix"]
    print(f"matrix ({m['configs']} configs, {m['tests']} tests): wall {m['wall_s']:.1f} s, loads {m['loads_s']:.1f} s "
          f"+ requests {m['requests_s']:.1f} s -> ratio {m['ratio']:.3f}  (goal <= 1.15)")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
