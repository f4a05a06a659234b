"""How much do fresh servers of one config differ, and which knobs make them agree?

For each variant of a config, S fresh servers are started, interleaved across variants
(v1 v2 v3 v1 v2 v3 ...), each measuring one workload (R repetitions after a warmup). Per
variant: the per-start medians of generation tok/s, their spread (max/min - 1), their
coefficient of variation, and the median within-start spread, to compare with.

    python benchmarks/start_spread.py [--starts 6] [--variant NAME ...] [--json out.json]

Variants: default, poll0/poll100 (``--poll``: how llama.cpp's threads wait for work), prio2
(``--prio 2``), strict (``--cpu-strict 1``: one thread per core), strict+prio2, threads1 (1 thread).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gate_accuracy import cpu_quota  # this folder: python benchmarks/start_spread.py

from pytest_llamabench.bench import RunningServer, measure
from pytest_llamabench.config import ServerConfig, Workload, load_matrix
from pytest_llamabench.hardware.host import host_fingerprint
from pytest_llamabench.metrics import GEN_TOK_S
from pytest_llamabench.server.build import BuildSpec, resolve_server_bin
from pytest_llamabench.server.launcher import LocalServer

REPO = Path(__file__).resolve().parent.parent
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "poll0": {"args": ("--poll", "0")},
    "poll100": {"args": ("--poll", "100")},
    "prio2": {"args": ("--prio", "2")},
    "strict": {"args": ("--cpu-strict", "1")},
    "threads1": {"threads": 1},
    "strict+prio2": {"args": ("--cpu-strict", "1", "--prio", "2")},
    "kv-q8": {"cache_type_k": "q8_0", "cache_type_v": "q8_0", "flash_attn": "on"},
    "quota1.8": {"cpu_quota": 1.8},
    "quota1.9": {"cpu_quota": 1.9},
}
def variant(base: ServerConfig, name: str) -> ServerConfig:
    spec = VARIANTS[name]
    server = {**base.server, **{k: v for k, v in spec.items() if k in base.server or k == "threads"}}
    return dataclasses.replace(base, server=server, args=(*base.args, *spec.get("args", ())))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--starts", type=int, default=6)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--n-predict", type=int, default=64)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--config", default="base")
    p.add_argument("--variant", action="append", choices=tuple(VARIANTS))
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    names = args.variant or list(VARIANTS)
    binary, _ = resolve_server_bin([(os.environ.get("LLAMABENCH_SERVER_BIN"), "LLAMABENCH_SERVER_BIN")],
                                   spec=BuildSpec(), build_if_missing=False, log=print)  # fmt: skip
    base = load_matrix([REPO / "configs/full.toml"]).configs[args.config]
    workload = Workload("gen", prompt_tokens=args.prompt_tokens, n_predict=args.n_predict,
                        repetitions=args.repetitions, warmup=1)  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as logs:
        for start in range(args.starts):
            for name in names:
                with LocalServer(variant(base, name), binary=binary, log_dir=Path(logs)) as server, \
                        cpu_quota(server.pids(), VARIANTS[name].get("cpu_quota")):
                    entry = measure(RunningServer(server), workload)
                samples = entry.samples(GEN_TOK_S.name)
                runs[name].append({"median": statistics.median(samples), "samples": list(samples),
                                   "host_load": entry.host_load})  # fmt: skip
                print(f"start {start + 1}/{args.starts} {name:9s} {statistics.median(samples):6.1f} tok/s  "
                      f"other cores {entry.host_load['other_cores'] if entry.host_load else '?'}", flush=True)
    host = host_fingerprint()
    print(f"\n{host['cpu']} ({host['cores']} cores), config {args.config}, {args.starts} fresh starts per variant, "
          f"R = {args.repetitions} (+1 warmup), prompt {args.prompt_tokens} / n_predict {args.n_predict}, "
          f"{(time.monotonic() - started) / 60:.1f} min")  # fmt: skip
    print("| variant | per-start median gen tok/s | spread across starts | CV across starts | within-start spread (median) | busy starts |")
    print("|---|---|---|---|---|---|")
    summary = {}
    for name, rows in runs.items():
        medians = [r["median"] for r in rows]
        within = statistics.median(max(r["samples"]) / min(r["samples"]) - 1 for r in rows)
        cv = statistics.stdev(medians) / statistics.fmean(medians) if len(medians) > 1 else 0.0
        spread = max(medians) / min(medians) - 1
        busy = sum(bool(r["host_load"] and r["host_load"]["busy"]) for r in rows)
        summary[name] = {"medians": medians, "spread": spread, "cv": cv, "within_start_spread": within, "busy": busy}
        print(f"| {name} | {' '.join(f'{m:.1f}' for m in medians)} | {spread:.1%} | {cv:.1%} | {within:.1%} | {busy} |")
    if args.json:
        args.json.write_text(json.dumps({"host": host, "args": {k: str(v) for k, v in vars(args).items()},
                                         "summary": summary, "runs": runs}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
