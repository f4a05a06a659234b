"""Write the README's result tables from the committed run reports under docs/.

Each table sits between ``<!-- generated: NAME -->`` and ``<!-- /generated -->`` in README.md
and is made here from a JSON report, never typed by hand.

    python scripts/readme_tables.py          # rewrite README.md
    python scripts/readme_tables.py --check  # exit 1 if README.md is out of date (a test runs this)
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pytest_llamabench.outputs.table import render, speed_table
from pytest_llamabench.results import RunReport

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
_BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /generated -->)", re.DOTALL)


def _load(path: str) -> Any:
    return json.loads((REPO / path).read_text())


def results_table(path: str) -> str:
    """The results table of a run report, with today's winner rule."""
    report = RunReport.load(REPO / path)
    rows, workloads, verdict = speed_table(report.per_unit())
    return f"From `{path}`:\n\n" + render(rows, workloads, markdown=True, verdict=verdict)


def start_spread(*paths: str) -> str:
    lines = ["| variant | per-start median gen tok/s | spread across starts | CV across starts | busy starts | report |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for path in paths:
        data = _load(path)
        for name, s in data["summary"].items():
            medians = " ".join(f"{m:.1f}" for m in s["medians"])
            lines.append(f"| {name} | {medians} | {s['spread']:.1%} | {s['cv']:.1%} | {s['busy']} | `{path}` |")
    host = _load(paths[0])["host"]
    return f"{host['cpu']}, {host['cores']} cores, config `base`, fresh servers interleaved across variants:\n\n" + "\n".join(lines) + "\n"


def gate_accuracy(*paths: str) -> str:
    lines = ["| run | identical pairs: false regressions | slow pairs: caught | gen tok/s ratio, identical | ratio, slow | detects (median) | busy starts | report |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for path in paths:
        data = _load(path)
        args = data["args"]
        pairs = data["pairs"]
        n = sum(p["kind"] == "identical" for p in pairs)
        false = sum(p["kind"] == "identical" and p["outcome"] == "regressed" for p in pairs)
        inconclusive = sum(p["kind"] == "identical" and p["outcome"] == "inconclusive" for p in pairs)
        caught = sum(p["kind"] == "slow" and p["outcome"] == "regressed" for p in pairs)
        ratios = {kind: sorted(r["ratio"] for p in pairs if p["kind"] == kind for r in p["rows"] if r["metric"] == "gen_tok_s")
                  for kind in ("identical", "slow")}  # fmt: skip
        mdes = [r["mde"] for p in pairs for r in p["rows"] if r["metric"] == "gen_tok_s" and r.get("mde") is not None]
        entries = [e for run in data["runs"] for e in run["entries"]]
        busy = sum(bool((e.get("host_load") or {}).get("busy")) for e in entries)
        what = f"{args['starts']} starts × R {args['repetitions']}" + (f", neighbour {args['neighbour']}" if args.get("neighbour") not in (None, "None") else "")
        span = {k: f"{statistics.median(v):.3f} ({v[0]:.2f}–{v[-1]:.2f})" for k, v in ratios.items()}
        lines.append(f"| {what} | **{false}/{n}** ({inconclusive} inconclusive) | **{caught}/{n}** | {span['identical']} | "
                     f"{span['slow']} | {statistics.median(mdes):.1%} | {busy}/{len(entries)} | `{path}` |")  # fmt: skip
    return "\n".join(lines) + "\n"


def gpu_noise(path: str) -> str:
    data = _load(path)
    starts: dict[str, list[tuple[int, float]]] = {}
    for r in data["results"]:
        starts.setdefault(r["config"], []).append((r["start"], r["metrics"]["gen_tok_s"]["median"]))
    lines = ["| config | gen tok/s per start (short) | spread | CV |", "|---|---|---|---|"]
    for config, values in starts.items():
        medians = [m for _, m in sorted(values)]
        cv = statistics.stdev(medians) / statistics.fmean(medians)
        lines.append(f"| {config} | {' '.join(f'{m:.1f}' for m in medians)} | {max(medians) / min(medians) - 1:.1%} | {cv:.1%} |")
    gpu = (data["fingerprint"].get("gpus") or [{}])[0].get("name", "GPU")
    return f"{gpu}, 16 GiB budget, `{path}`:\n\n" + "\n".join(lines) + "\n"


def load_curves(path: str) -> str:
    """The throughput-vs-latency tables (with knees) of a report's concurrent workloads."""
    from pytest_llamabench.outputs import load_table

    report = RunReport.load(REPO / path)
    gpus = report.fingerprint.get("gpus") or []
    where = gpus[0].get("name") if gpus else (report.fingerprint.get("host") or {}).get("cpu")
    return f"From `{path}` ({where}):\n\n" + load_table.render(load_table.build_curves(report.per_unit()), markdown=True)


def harness_load(*paths: str) -> str:
    """The harness's own cost under concurrent load (benchmarks/harness_overhead.py --only-load)."""
    lines = ["| device | config | streams | aggregate tok/s | harness CPU (cores) | server CPU (cores) | harness share "
             "of CPU time | client vs server tok/s per request (median / p90 / max) | report |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for path in paths:
        c = _load(path)["concurrent"]
        lines.append(f"| {c.get('device')} | {c['config']} | {c['streams']} | {c['agg_tok_s_median']:.1f} | "
                     f"{c['harness_cores']:.3f} | {c['server_cores']:.2f} | {c['harness_share_of_cpu_pct']:.1f}% | "
                     f"{c['client_vs_server_pct_median']:.2f}% / {c['client_vs_server_pct_p90']:.2f}% / "
                     f"{c['client_vs_server_pct_max']:.2f}% | `{path}` |")  # fmt: skip
    return "\n".join(lines) + "\n"


def quality_ladder(path: str) -> str:
    """The quant quality table of a run report."""
    from pytest_llamabench.outputs import quality_table

    rows = quality_table.build_rows(RunReport.load(REPO / path).per_unit())
    return f"From `{path}`:\n\n" + quality_table.render(rows, markdown=True)


def committed_markdown(path: str) -> str:
    """A table a benchmark script wrote as markdown beside its JSON (e.g. parallel_vs_serial.py)."""
    return f"From `{path}`:\n\n" + (REPO / path).read_text().strip() + "\n"


def quality_cost(*paths: str) -> str:
    """benchmarks/quality_cost.py: seconds per 1k scored tokens, and the cached reference reused."""
    lines = ["| machine | config | round | reference | wall s / 1k tokens | llama-perplexity compute s / 1k tokens | report |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for path in paths:
        data = _load(path)
        where = "H200 (CUDA)" if "cuda" in str(data.get("server_bin")) else "2-core VM (CPU)"
        for run in data["runs"]:
            compute = run.get("compute_s_per_1k_tokens")
            lines.append(f"| {where} | {run['config']} ({run['role']}) | {run['round']} | "
                         f"{'from the cache' if run['reference_cached'] else 'computed'} | {run['wall_s_per_1k_tokens']:.2f} | "
                         f"{'—' if compute is None else f'{compute:.2f}'} | `{path}` |")  # fmt: skip
    return "\n".join(lines) + "\n"


def interruptions(path: str) -> str:
    data = _load(path)
    return f"From `{path}`:\n\n" + str(data["table"]).strip() + "\n"


def hash_cost(path: str) -> str:
    """benchmarks/hash_cost.py: sha256 throughput in memory, from disk (cold) and from the page cache."""
    data = _load(path)
    what = {"cpu": "in memory (the CPU alone)", "cold": "from disk (page cache dropped)", "warm": "from the page cache"}
    facts = data["facts"]
    lines = [f"From `{path}` ({facts['size_gb']:.0f} GB file, {facts['runs']} runs, {facts['openssl']}):", "",
             "| sha256 | GB/s | a 20 GB model takes |", "|---|---|---|"]  # fmt: skip
    for kind, row in data["summary"].items():
        lines.append(f"| {what.get(kind, kind)} | {row['gb_per_s']:.2f} | {row['seconds_for_20_gb']:.0f} s |")
    return "\n".join(lines) + "\n"


TABLES: dict[str, Callable[[], str]] = {
    "quality-cost": lambda: quality_cost("docs/quality/cost-cpu.json", "docs/quality/cost-h200.json"),
    "parallel-vs-serial": lambda: committed_markdown("docs/parallel/parallel-vs-serial.md"),
    "qwen35-plan": lambda: committed_markdown("docs/qwen35-run/plan-table.md"),
    "qwen35-checks": lambda: committed_markdown("docs/qwen35-run/checks/tables.md"),
    "interruptions": lambda: interruptions("docs/interruptions/interruptions.json"),
    "hash-cost": lambda: hash_cost("docs/hash-cost/hash-cost.json"),
    "quality-ladder": lambda: quality_ladder("docs/quality/report.json"),
    "concurrency-cpu": lambda: load_curves("docs/concurrency/cpu/report.json"),
    "concurrency-gpu": lambda: load_curves("docs/concurrency/gpu/report.json"),
    "harness-load": lambda: harness_load("docs/concurrency/cpu/harness-overhead.json",
                                         "docs/concurrency/gpu/harness-overhead.json"),  # fmt: skip
    "gpu-matrix": lambda: results_table("docs/gpu-run/synthetic-matrix-16GiB.json"),
    "default-matrix": lambda: results_table("docs/default-run/report.json"),
    "start-spread": lambda: start_spread("docs/noise/start-spread-knobs.json", "docs/noise/start-spread-strict.json"),
    "gate-accuracy": lambda: gate_accuracy("docs/noise/gate-accuracy-6-starts.json",
                                           "docs/noise/gate-accuracy-busy-neighbour.json"),  # fmt: skip
    "gpu-noise": lambda: gpu_noise("docs/noise/gpu/noise.json"),
}


def rendered(text: str) -> str:
    def fill(match: re.Match[str]) -> str:
        name = match.group("name")
        if name not in TABLES:
            raise SystemExit(f"README.md: unknown generated block {name!r}; known: {', '.join(TABLES)}")
        return f"{match.group(1)}{TABLES[name]()}{match.group(4)}"

    return _BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 when README.md differs from the reports")
    args = p.parse_args(argv)
    text = README.read_text()
    new = rendered(text)
    if args.check:
        if new != text:
            print("README.md is out of date with docs/: run python scripts/readme_tables.py", file=sys.stderr)
            return 1
        return 0
    README.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
