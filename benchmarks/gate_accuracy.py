"""How often the regression gate is wrong, measured with real llama-servers on this machine.

For each of N pairs, a fresh server runs the same workload (R repetitions after a warmup):

* A   the base config (``base`` of configs/default.toml: 2 threads, the embedded SmolLM2 Q4_1);
* A'  the same config again, a fresh server: "identical" pair A vs A';
* B   a real slowdown of the same config: "slow" pair A vs B.

Each side becomes an in-memory ``results.RunReport`` and ``gate.compare`` judges it
with the default tolerances, as ``--llamabench-baseline``
and ``python -m pytest_llamabench compare`` do. A false regression is an identical pair
judged "regressed"; a caught regression is a slow pair judged "regressed".

The slowdown (``--slow``): ``f16`` (default) is the same model requantized to F16 with the
build's llama-quantize: 2.75x the bytes per token, measured 19-45 % fewer generation tok/s
(median 31 %, 20 runs) at 2 threads here. ``threads1`` (17-30 % here when the box is
otherwise idle) flips sign when anything else runs: 2 threads on 2 shared cores then
collapse (8-15 tok/s) while 1 thread keeps 50-60. ``f32`` is about half the tok/s. A smaller ubatch changes only
prompt processing, not generation, on this model (measured: no effect at ubatch 8).

The pairs share A (order A, A', B, then A, B, A' on the next pair), so the 20 identical and
the 20 slow pairs are each independent. Since the samples of a run are its repetitions in
order, the summary also shows the verdicts had only the first k repetitions been run.

    python benchmarks/gate_accuracy.py [--pairs 20] [--repetitions 5] [--slow f16] [--json rows.json]

Exit status: 0 when the goal holds (0 false regressions, at most one slow pair missed per
20), 1 when it does not, 2 on an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from pytest_llamabench.server.build import BuildSpec, resolve_server_bin
from pytest_llamabench.gate import INCONCLUSIVE, MIN_SAMPLES, REGRESSED, Comparison, compare, min_repetitions
from pytest_llamabench.config import ServerConfig, Workload, load_matrix
from pytest_llamabench.errors import LlamabenchError
from pytest_llamabench.server.launcher import LocalServer
from pytest_llamabench.hardware.host import host_fingerprint
from pytest_llamabench.metrics import GEN_TOK_S
from pytest_llamabench.results import ResultEntry, RunReport, Summary
from pytest_llamabench.bench import RunningServer, measure

REPO = Path(__file__).resolve().parent.parent
SLOWDOWNS = ("f16", "f32", "threads1")
HOST = host_fingerprint()


@dataclasses.dataclass
class Run:
    """One server's measurement: the report entry and the conditions it ran in."""

    name: str
    pair: int
    entry: ResultEntry
    wall_s: float
    load_1m: float

    def median(self, metric: str = GEN_TOK_S.name) -> float:
        value = self.entry.median(metric)
        return math.nan if value is None else value

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "entry": self.entry.as_dict()}


# -- setup ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=20, help="identical pairs and slow pairs, each (default 20)")
    p.add_argument("--repetitions", type=int, default=5, help="measured repetitions per server (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="warmup repetitions per server (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--n-predict", type=int, default=48)
    p.add_argument("--matrix", type=Path, default=REPO / "configs/default.toml")
    p.add_argument("--config", default="base", help="config A (default: base)")
    p.add_argument("--threads", type=int, help="override config A's threads (B keeps the same, except threads1)")
    p.add_argument("--slow", choices=SLOWDOWNS, default="f16", help="how B is slower (default f16)")
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--server-bin", help="llama-server (default: LLAMABENCH_SERVER_BIN, PATH, the cached build)")
    p.add_argument("--json", type=Path, help="write every run's samples and every pair's verdicts here")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.repetitions < 1 or args.warmup < 0:
        p.error("--pairs and --repetitions must be >= 1, --warmup >= 0")
    return args


def server_binary(args: argparse.Namespace) -> Path:
    candidates = [(args.server_bin, "--server-bin"), (os.environ.get("LLAMABENCH_SERVER_BIN"), "LLAMABENCH_SERVER_BIN")]
    path, _ = resolve_server_bin(candidates, spec=BuildSpec(), build_if_missing=False, log=print)
    return path


def configs(args: argparse.Namespace, binary: Path, workdir: Path) -> tuple[ServerConfig, ServerConfig, str]:
    """Config A, config B (same name: the same report key) and a description of B."""
    base = load_matrix([args.matrix]).configs[args.config]
    if args.threads:
        base = dataclasses.replace(base, server={**base.server, "threads": args.threads})
    if args.slow == "threads1":
        if base.server.get("threads") == 1:
            raise SystemExit("--slow threads1: config A already runs 1 thread; pass --threads 2")
        return base, dataclasses.replace(base, server={**base.server, "threads": 1}), "threads = 1"
    model = requantize(binary, base.model.resolve(), args.slow.upper(), workdir)
    slow_model = dataclasses.replace(base.model, path=model, embedded=None, sha256=None, size=None)
    return base, dataclasses.replace(base, model=slow_model), f"the model requantized to {args.slow.upper()}"


def requantize(binary: Path, model: Path, kind: str, workdir: Path) -> Path:
    quantize = binary.parent / "llama-quantize"
    if not quantize.is_file():
        raise SystemExit(f"--slow {kind.lower()}: no llama-quantize next to {binary}; use --slow threads1")
    out = workdir / f"{model.stem}-{kind}.gguf"
    subprocess.run([str(quantize), "--allow-requantize", str(model), str(out), kind], check=True, capture_output=True)
    return out


# -- measuring -----------------------------------------------------------------------------------


def run_server(name: str, pair: int, config: ServerConfig, workload: Workload, binary: Path, logs: Path) -> Run:
    started = time.monotonic()
    with LocalServer(config, binary=binary, log_dir=logs) as server:
        entry = measure(RunningServer(server), workload)
    entry.outcome = "passed"
    return Run(name, pair, entry, time.monotonic() - started, os.getloadavg()[0])


def judge(base: Run, new: Run, alpha: float, first: int | None = None) -> Comparison:
    """The gate's verdict on two runs, optionally on only their first ``first`` repetitions."""
    return compare(as_report(base, first), as_report(new, first), alpha=alpha, fingerprint="warn")


def as_report(run: Run, first: int | None) -> RunReport:
    entry = run.entry
    if first is not None:
        entry = dataclasses.replace(entry, metrics={m: Summary(s.samples[:first]) for m, s in entry.metrics.items()})
    return RunReport(fingerprint={"host": HOST}, results=[entry], finished=True, source=f"{run.name}#{run.pair}")


# -- summary -------------------------------------------------------------------------------------------


def outcome(comparison: Comparison) -> str:
    if comparison.regressed:
        return REGRESSED
    return INCONCLUSIVE if any(row.verdict == INCONCLUSIVE for row in comparison.rows) else "clean"


def pair_row(kind: str, base: Run, new: Run, comparison: Comparison) -> dict[str, Any]:
    return {
        "kind": kind,
        "pair": base.pair,
        "outcome": outcome(comparison),
        "summary": comparison.summary(),
        "rows": [{"metric": r.metric, "verdict": r.verdict, "ratio": r.ratio, "p": r.p_value, "reason": r.reason}
                 for r in comparison.rows],  # fmt: skip
    }


def describe_pairs(kind: str, rows: list[dict[str, Any]]) -> str:
    c = Counter(r["outcome"] for r in rows if r["kind"] == kind)
    n = sum(c.values())
    by_metric = Counter(x["metric"] for r in rows if r["kind"] == kind for x in r["rows"] if x["verdict"] == REGRESSED)
    metrics = ", ".join(f"{m} {k}" for m, k in by_metric.most_common()) or "none"
    if kind == "identical":
        return (f"identical pairs: {c[REGRESSED]}/{n} false regressions, {c[INCONCLUSIVE]} inconclusive, "
                f"{c['clean']} no change/improved  (regressed rows by metric: {metrics})")  # fmt: skip
    return (f"slow pairs:      {c[REGRESSED]}/{n} caught, {c[INCONCLUSIVE]} inconclusive, "
            f"{c['clean']} missed  (regressed rows by metric: {metrics})")  # fmt: skip


def ratio_line(kind: str, pairs: list[tuple[Run, Run]]) -> str:
    ratios = sorted(new.median() / base.median() for base, new in pairs)
    return (f"  {GEN_TOK_S} ratio new/base, {kind}: median {statistics.median(ratios):.3f}, "
            f"range {ratios[0]:.3f}-{ratios[-1]:.3f}")  # fmt: skip


def by_repetitions(identical: list[tuple[Run, Run]], slow: list[tuple[Run, Run]], reps: int, alpha: float) -> list[str]:
    lines = []
    for k in range(MIN_SAMPLES, reps + 1):
        false = sum(judge(a, b, alpha, k).regressed for a, b in identical)
        caught = sum(judge(a, b, alpha, k).regressed for a, b in slow)
        lines.append(f"  first {k} of {reps} repetitions: {false}/{len(identical)} false regressions, "
                     f"{caught}/{len(slow)} slow pairs caught")  # fmt: skip
    return lines


def goal_met(rows: list[dict[str, Any]], pairs: int) -> bool:
    false = sum(1 for r in rows if r["kind"] == "identical" and r["outcome"] == REGRESSED)
    caught = sum(1 for r in rows if r["kind"] == "slow" and r["outcome"] == REGRESSED)
    return false == 0 and caught >= pairs - pairs // 20


# -- main -------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # stop servers, remove temp files
    started = time.monotonic()
    workload = Workload("gen", prompt_tokens=args.prompt_tokens, n_predict=args.n_predict,
                        repetitions=args.repetitions, warmup=args.warmup, source="gate_accuracy")  # fmt: skip
    try:
        binary = server_binary(args)
        with tempfile.TemporaryDirectory(prefix="gate-accuracy-") as tmp:
            config_a, config_b, slow_text = configs(args, binary, Path(tmp))
            print(f"A = {args.config} (threads = {config_a.server.get('threads')}), B = A with {slow_text}; "
                  f"{args.pairs} pairs each, R = {args.repetitions} (+{args.warmup} warmup), prompt "
                  f"{args.prompt_tokens} / n_predict {args.n_predict}, alpha {args.alpha:g} "
                  f"(MWU needs R >= {min_repetitions(args.alpha)}); {binary}", flush=True)  # fmt: skip
            runs, identical, slow, rows = measure_pairs(args, binary, config_a, config_b, workload, Path(tmp))
    except LlamabenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    wall = time.monotonic() - started
    loads = [r.load_1m for r in runs]
    lines = [
        "",
        f"gate accuracy on {HOST['cpu']} ({HOST['cores']} cores), R = {args.repetitions}, default tolerances, "
        f"alpha {args.alpha:g}, B = {slow_text}",
        describe_pairs("identical", rows),
        describe_pairs("slow", rows),
        ratio_line("identical", identical),
        ratio_line("slow", slow),
        *by_repetitions(identical, slow, args.repetitions, args.alpha),
        f"  1-minute load average after each run: median {statistics.median(loads):.2f}, max {max(loads):.2f}",
        f"  wall time {wall / 60:.1f} min ({len(runs)} servers, {statistics.median(r.wall_s for r in runs):.1f} s each)",
        f"goal (0 false regressions, >= {args.pairs - args.pairs // 20}/{args.pairs} caught): "
        f"{'met' if goal_met(rows, args.pairs) else 'NOT met'}",
    ]
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "host": HOST,
                                         "wall_s": wall, "pairs": rows,
                                         "runs": [r.as_dict() for r in runs]}, indent=1))  # fmt: skip
        print(f"rows: {args.json}")
    return 0 if goal_met(rows, args.pairs) else 1


def measure_pairs(
    args: argparse.Namespace, binary: Path, config_a: ServerConfig, config_b: ServerConfig, workload: Workload, tmp: Path
) -> tuple[list[Run], list[tuple[Run, Run]], list[tuple[Run, Run]], list[dict[str, Any]]]:
    runs: list[Run] = []
    identical: list[tuple[Run, Run]] = []
    slow: list[tuple[Run, Run]] = []
    rows: list[dict[str, Any]] = []
    for i in range(args.pairs):
        t0 = time.monotonic()
        base = run_server("A", i, config_a, workload, binary, tmp / "logs")
        order = [("A'", config_a), ("B", config_b)]
        done = {name: run_server(name, i, config, workload, binary, tmp / "logs")
                for name, config in (order if i % 2 == 0 else order[::-1])}  # fmt: skip
        runs += [base, *done.values()]
        identical.append((base, done["A'"]))
        slow.append((base, done["B"]))
        same, slower = judge(base, done["A'"], args.alpha), judge(base, done["B"], args.alpha)
        rows += [pair_row("identical", base, done["A'"], same), pair_row("slow", base, done["B"], slower)]
        again, slowed = done["A'"], done["B"]
        print(f"pair {i + 1:2d}/{args.pairs}: gen tok/s A {base.median():5.1f}  A' {again.median():5.1f}"
              f"  B {slowed.median():5.1f}   identical: {same.summary():<40}  slow: {slower.summary():<40}  "
              f"load {os.getloadavg()[0]:.2f}  {time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
    return runs, identical, slow, rows


if __name__ == "__main__":
    sys.exit(main())
