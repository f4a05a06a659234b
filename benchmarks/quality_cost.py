"""What a quality workload costs, and proof that a second run reuses the cached reference logits.

Runs the quality workload of a matrix (default ``configs/quality.toml``) twice, pytest-free,
through ``quality.run.run_quality`` with a fresh cache: first the reference config (computes and
caches the reference logits), then a candidate (KL divergence against them); then both again.
Prints and writes (``--out``) per run: wall seconds, tokens scored, seconds per 1k tokens (wall,
and without llama-perplexity's model load), and whether the reference was computed or taken
from the cache. Needs a quiet machine: do not run it next to other work.

    python benchmarks/quality_cost.py --chunks 16 --out docs/quality/cost-cpu.json      # quiet 2-core VM
    python benchmarks/quality_cost.py --server-bin ~/.cache/pytest-llamabench/llama.cpp/llama-cpp-python-0.3.36-cuda-sm90-avx2/bin/llama-server \
        --gpu --chunks 64 --out docs/quality/cost-h200.json                               # H200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from pytest_llamabench.config import load_matrix
from pytest_llamabench.quality.run import QualitySettings, run_quality
from pytest_llamabench.server.build import BuildSpec, resolve_server_bin

_LOAD = re.compile(r"load time =\s*([\d.]+) ms")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--matrix", type=Path, default=Path(__file__).parents[1] / "configs" / "quality.toml")
    parser.add_argument("--workload", default="quality")
    parser.add_argument("--reference-config", default="Q4_1")
    parser.add_argument("--candidate", default="Q4_K_M")
    parser.add_argument("--server-bin", help="a llama-server whose build dir holds llama-perplexity (default: the pinned CPU build)")
    parser.add_argument("--gpu", action="store_true", help="gpu = true, n_gpu_layers = 99 for both configs")
    parser.add_argument("--chunks", type=int, help="override the workload's chunks")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    matrix = load_matrix([args.matrix])
    workload = matrix.workloads[args.workload]
    assert workload.quality is not None
    if args.chunks:
        workload = dataclasses.replace(workload, quality=dataclasses.replace(workload.quality, chunks=args.chunks))
    assert workload.quality is not None
    ctx = workload.quality.ctx
    configs = [matrix.configs[args.reference_config], matrix.configs[args.candidate]]
    if args.gpu:
        configs = [dataclasses.replace(c, gpu=True, server={**c.server, "n_gpu_layers": 99}) for c in configs]
    binary, where = resolve_server_bin([(args.server_bin, "--server-bin")], spec=BuildSpec(), build_if_missing=True,
                                       log=print)  # fmt: skip
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="quality-cost-") as tmp:
        settings = QualitySettings(server_binary=binary, server_where=where, cache_dir=Path(tmp) / "cache",
                                   log_dir=Path(tmp) / "logs", log=print)  # fmt: skip
        for round_ in (1, 2):
            for config in configs:
                started = time.monotonic()
                entry = run_quality(config, workload, settings, reference_config=configs[0])
                wall = time.monotonic() - started
                facts = entry.extra["quality"]
                runs.append(_row(round_, config.name, entry.metrics, facts, wall, ctx))
                print(json.dumps(runs[-1]))
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "python": sys.version.split()[0]},
              "server_bin": str(binary), "matrix": str(args.matrix), "workload": args.workload, "runs": runs}  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    second_ref = next(r for r in runs if r["round"] == 2 and r["role"] == "reference")
    print(f"second run: reference logits {'reused from the cache' if second_ref['reference_cached'] else 'COMPUTED AGAIN'}")
    return 0 if second_ref["reference_cached"] else 1


def _row(round_: int, config: str, metrics: dict[str, Any], facts: dict[str, Any], wall: float, ctx: int) -> dict[str, Any]:
    reference = facts.get("reference") or {}
    chunks = facts.get("chunks") or 0
    scored = chunks * ctx  # tokens evaluated (each chunk is one full context)
    load_s = None  # llama-perplexity's model load, from its log (only a run that ran has one)
    if facts.get("log") and Path(facts["log"]).is_file():
        if m := _LOAD.search(Path(facts["log"]).read_text(errors="replace")):
            load_s = float(m.group(1)) / 1000
    tool_s = facts.get("seconds")
    compute = tool_s - load_s if tool_s and load_s is not None else None
    return {
        "round": round_, "config": config, "role": facts.get("role"), "wall_s": round(wall, 3),
        "tool_s": facts.get("seconds"), "tokens": scored,
        "wall_s_per_1k_tokens": round(wall / scored * 1000, 3) if scored else None,
        "load_s": load_s, "compute_s_per_1k_tokens": round(compute / scored * 1000, 3) if compute and scored else None,
        "reference_cached": reference.get("cached"), "reference_s": reference.get("seconds"),
        "ppl": metrics["ppl"].median if "ppl" in metrics else None,
        "kld_mean": metrics["kld_mean"].median if "kld_mean" in metrics else None,
    }  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
