"""Do parallel results match serial ones? One matrix run with ``pytest -n 2`` against one with
``-n 0``, both with the same VRAM budget (scripts/gpu-session.sh makes them on 2 GPUs).

    python benchmarks/parallel_vs_serial.py SERIAL.json PARALLEL.json \\
        [--noise docs/noise/gpu/noise.json --noise-config C7] [--out table.md]

Per config: mean generation tok/s over its workloads in each run and their ratio, judged
against the start-to-start spread (max/min - 1 of per-start medians) of ``--noise-config`` in
the ``--noise`` report (fresh servers of one config differ that much with nothing changed);
the GPUs and cores each config ran on in the parallel run; its peak VRAM per GPU against the
budget; and both outcomes (an OOM in only one run is a racing ballast's or a shared GPU's).
Then the wall-time ratio (goal <= 0.6). Exit 1 when a check fails.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
from pathlib import Path
from typing import Any

from pytest_llamabench.metrics import GEN_TOK_S
from pytest_llamabench.results import ResultEntry, RunReport

REPO = Path(__file__).resolve().parent.parent
WALL_GOAL = 0.6


def wall_s(report: RunReport) -> float:
    """From the report's start to its last write (the end of the run), in seconds."""
    start, end = (datetime.datetime.fromisoformat(t) for t in (report.started_at, report.updated_at))
    return (end - start).total_seconds()


def start_spread(noise: RunReport, config: str) -> float:
    """max/min - 1 of the per-start median generation tok/s of ``config`` (first workload)."""
    entries = [e for e in noise.results if e.config == config and e.median(GEN_TOK_S.name)]
    if not entries:
        raise SystemExit(f"{noise.source}: no results of config {config!r}; pick one with --noise-config")
    workload = entries[0].workload
    medians = [e.median(GEN_TOK_S.name) or 0.0 for e in entries if e.workload == workload]
    if len(medians) < 2:
        raise SystemExit(f"{noise.source}: {config} has {len(medians)} server start(s); a spread needs several")
    return max(medians) / min(medians) - 1


def by_config(report: RunReport) -> dict[str, list[ResultEntry]]:
    grouped: dict[str, list[ResultEntry]] = {}
    for entry in report.per_unit():
        if entry.config:
            grouped.setdefault(entry.config, []).append(entry)
    return grouped


def mean_gen(entries: list[ResultEntry]) -> float | None:
    values = [v for e in entries if e.ok and (v := e.median(GEN_TOK_S.name)) is not None]
    return statistics.fmean(values) if values else None


def outcome(entries: list[ResultEntry]) -> str:
    failed = [e for e in entries if not e.ok]
    if not failed:
        return "passed"
    e = failed[0]
    return f"{e.outcome} ({e.failure.kind})" if e.failure else str(e.outcome)


def placement(entries: list[ResultEntry]) -> dict[str, Any]:
    for entry in entries:
        place = (entry.server or {}).get("placement")
        if isinstance(place, dict):
            return place
    return {}


def vram_per_gpu(entries: list[ResultEntry]) -> dict[str, float]:
    peaks: dict[str, float] = {}
    for entry in entries:
        for uuid, mib in ((entry.server or {}).get("vram") or {}).get("peak_by_device", {}).items():
            peaks[uuid] = max(peaks.get(uuid, 0.0), float(mib))
    return peaks


def compare(serial: RunReport, parallel: RunReport, spread: float) -> tuple[str, list[str]]:
    """(markdown table and summary, failed checks)."""
    budget = parallel.fingerprint.get("vram_budget_mib")
    s_configs, p_configs = by_config(serial), by_config(parallel)
    failures: list[str] = []
    lines = [
        "| config | serial gen tok/s | parallel gen tok/s | ratio | within start noise | worker: GPU, cores "
        "| peak VRAM per GPU (MiB) | outcome serial / parallel |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys([*s_configs, *p_configs]):
        s_entries, p_entries = s_configs.get(name, []), p_configs.get(name, [])
        s_gen, p_gen = mean_gen(s_entries), mean_gen(p_entries)
        ratio = p_gen / s_gen if s_gen and p_gen else None
        within = "—" if ratio is None else ("yes" if abs(ratio - 1) <= spread else "**no**")
        if ratio is not None and abs(ratio - 1) > spread:
            failures.append(f"{name}: parallel/serial {ratio:.2f} is outside the start-to-start spread ±{spread:.0%}")
        place = placement(p_entries)
        where = (f"{place.get('worker', '?')}: {', '.join(d[:12] for d in place.get('devices') or []) or '—'}, "
                 f"{place.get('cpus') or 'all'}") if place else "—"  # fmt: skip
        peaks = vram_per_gpu(p_entries)
        over = [u for u, mib in peaks.items() if budget and mib > budget]
        if over:
            failures.append(f"{name}: peak VRAM above the {budget} MiB budget on {', '.join(over)}")
        s_out, p_out = outcome(s_entries), outcome(p_entries)
        if s_out != p_out:
            failures.append(f"{name}: {s_out} serially but {p_out} in parallel")
        lines.append(
            f"| {name} | {_num(s_gen)} | {_num(p_gen)} | {'—' if ratio is None else f'{ratio:.2f}'} | {within} | "
            f"{where} | {' + '.join(f'{v:.0f}' for v in peaks.values()) or '—'} | {s_out} / {p_out} |"
        )
    s_wall, p_wall = wall_s(serial), wall_s(parallel)
    wall_ratio = p_wall / s_wall if s_wall else float("nan")
    if not wall_ratio <= WALL_GOAL:
        failures.append(f"wall time ratio {wall_ratio:.2f} is above the goal {WALL_GOAL}")
    workers = {p.get("worker"): tuple(p.get("devices") or ()) for e in p_configs.values() if (p := placement(e))}
    shared = len(set(workers.values())) < len(workers)
    if shared:
        failures.append(f"workers shared a GPU: {workers}")
    lines += [
        "",
        f"Wall time: serial {s_wall:.0f} s, parallel {p_wall:.0f} s, ratio **{wall_ratio:.2f}** (goal ≤ {WALL_GOAL}). "
        f"Start-to-start spread used as the noise band: ±{spread:.1%}. VRAM budget: {budget or '—'} MiB per GPU. "
        f"Workers on distinct GPUs: {'no' if shared else 'yes'} ({len(workers)} worker(s)).",
    ]
    return "\n".join(lines) + "\n", failures


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("serial", type=Path, help="the -n 0 report")
    p.add_argument("parallel", type=Path, help="the -n 2 report")
    p.add_argument("--noise", type=Path, default=REPO / "docs/noise/gpu/noise.json",
                   help="a report with several fresh servers of one config (restarts)")  # fmt: skip
    p.add_argument("--noise-config", default="C7")
    p.add_argument("--out", type=Path, help="also write the markdown here")
    args = p.parse_args(argv)
    spread = start_spread(RunReport.load(args.noise), args.noise_config)
    text, failures = compare(RunReport.load(args.serial), RunReport.load(args.parallel), spread)
    print(text)
    for failure in failures:
        print(f"FAILED: {failure}")
    if args.out:
        args.out.write_text(text)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
