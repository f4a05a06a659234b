"""How often the regression gate is wrong, measured with real llama-servers on this machine.

For each of N pairs, K fresh servers per side (``--starts``, interleaved A A' B A A' B ...)
run the same workload (R repetitions after a warmup):

* A   the base config (``base`` of configs/full.toml: 2 threads, the embedded SmolLM2 Q4_1);
* A'  the same config again, fresh servers: "identical" pair A vs A';
* B   a real slowdown of the same config: "slow" pair A vs B.

With K > 1 the gate's unit is the server start (each start's median), as in a run with
``--llamabench-restarts=K``; with K = 1 it sees one server's repetitions per side.

Each side becomes an in-memory ``results.RunReport`` and ``gate.compare`` judges it
with the default tolerances, as ``--llamabench-baseline``
and ``python -m pytest_llamabench compare`` do. A false regression is an identical pair
judged "regressed"; a caught regression is a slow pair judged "regressed".

The slowdown (``--slow``): ``quota`` (default) puts B's server in a cgroup (v1) limited to
``--quota-cores`` CPUs (1.85 of 2: about 10 % fewer tok/s here). ``f16`` is the same model requantized to F16 with the
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
import contextlib
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
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pytest_llamabench.server.build import BuildSpec, resolve_server_bin
from pytest_llamabench.gate import INCONCLUSIVE, MIN_SAMPLES, REGRESSED, Comparison, compare, min_repetitions
from pytest_llamabench.config import ServerConfig, Workload, load_matrix
from pytest_llamabench.errors import LlamabenchError
from pytest_llamabench.server.launcher import LocalServer
from pytest_llamabench.hardware.host import host_fingerprint
from pytest_llamabench.metrics import GEN_TOK_S
from pytest_llamabench.results import ResultEntry, RunReport
from pytest_llamabench.stats import Summary
from pytest_llamabench.bench import RunningServer, measure

REPO = Path(__file__).resolve().parent.parent
SLOWDOWNS = ("quota", "f16", "f32", "threads1")
CGROUP = Path("/sys/fs/cgroup/cpu/llamabench-gate-accuracy")
HOST = host_fingerprint()


@dataclasses.dataclass
class Run:
    """One server's measurement: the report entry and the conditions it ran in."""

    name: str
    pair: int
    entries: list[ResultEntry]  # one per server start
    wall_s: float
    load_1m: float

    def median(self, metric: str = GEN_TOK_S.name) -> float:
        medians = [v for e in self.entries if (v := e.median(metric)) is not None]
        return statistics.median(medians) if medians else math.nan

    @property
    def busy(self) -> int:
        return sum(bool(e.host_load and e.host_load.get("busy")) for e in self.entries)

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "pair": self.pair, "wall_s": self.wall_s, "load_1m": self.load_1m,
                "entries": [e.as_dict() for e in self.entries]}  # fmt: skip


# -- setup ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=20, help="identical pairs and slow pairs, each (default 20)")
    p.add_argument("--starts", type=int, default=1, help="fresh servers per side of a pair (default 1)")
    p.add_argument("--repetitions", type=int, default=5, help="measured repetitions per server (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="warmup repetitions per server (default 1)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--n-predict", type=int, default=48)
    p.add_argument("--matrix", type=Path, default=REPO / "configs/full.toml")
    p.add_argument("--config", default="base", help="config A (default: base)")
    p.add_argument("--threads", type=int, help="override config A's threads (B keeps the same, except threads1)")
    p.add_argument("--slow", choices=SLOWDOWNS, default="quota", help="how B is slower (default quota)")
    p.add_argument("--quota-cores", type=float, default=1.85, help="B's CPU quota with --slow quota")
    p.add_argument("--neighbour", type=float, metavar="DUTY",
                   help="run a process that spins DUTY (0..1) of one core next to every A' server: the "
                        "identical pairs then compare a quiet A with a busy A'")  # fmt: skip
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--server-bin", help="llama-server (default: LLAMABENCH_SERVER_BIN, PATH, the cached build)")
    p.add_argument("--json", type=Path, help="write every run's samples and every pair's verdicts here")
    args = p.parse_args(argv)
    if args.pairs < 1 or args.repetitions < 1 or args.warmup < 0 or args.starts < 1:
        p.error("--pairs, --starts and --repetitions must be >= 1, --warmup >= 0")
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
    if args.slow == "quota":
        return base, dataclasses.replace(base, description=f"quota {args.quota_cores}"), \
            f"its server limited to {args.quota_cores:g} CPUs (cgroup quota)"
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


@contextlib.contextmanager
def neighbour(duty: float | None) -> Iterator[None]:
    """Another process busy ``duty`` of the time on one core (50 ms periods), or nothing."""
    if not duty:
        yield
        return
    code = ("import time\nwhile True:\n    t = time.time()\n    while time.time() - t < 0.05 * D: pass\n"
            "    time.sleep(0.05 * (1 - D))\n").replace("D", repr(duty))  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def cpu_quota(pids: set[int], cores: float | None) -> Iterator[None]:
    """A real slowdown: the server's processes in a cgroup (v1) limited to ``cores`` CPUs."""
    if cores is not None:
        CGROUP.mkdir(exist_ok=True)
        (CGROUP / "cpu.cfs_period_us").write_text("100000")
        (CGROUP / "cpu.cfs_quota_us").write_text(str(int(cores * 100000)))
        for pid in pids:
            (CGROUP / "cgroup.procs").write_text(str(pid))
    yield


def run_server(run: Run, start: int, config: ServerConfig, workload: Workload, binary: Path, logs: Path,
               busy: float | None = None) -> None:  # fmt: skip
    """One more fresh server start of ``run`` (next to a busy neighbour process, with ``busy``)."""
    started = time.monotonic()
    quota = float(config.description.split()[1]) if config.description.startswith("quota ") else None
    with neighbour(busy), LocalServer(config, binary=binary, log_dir=logs) as server, cpu_quota(server.pids(), quota):
        entry = measure(RunningServer(server), workload)
    entry.outcome = "passed"
    entry.start = start if start else None
    run.entries.append(entry)
    run.wall_s += time.monotonic() - started
    run.load_1m = os.getloadavg()[0]


def judge(base: Run, new: Run, alpha: float, first: int | None = None) -> Comparison:
    """The gate's verdict on two runs, optionally on only their first ``first`` starts (or
    repetitions, with one start per side)."""
    return compare(as_report(base, first), as_report(new, first), alpha=alpha, fingerprint="warn")


def as_report(run: Run, first: int | None) -> RunReport:
    entries = run.entries
    if first is not None and len(entries) > 1:
        entries = entries[:first]
    elif first is not None:
        entries = [dataclasses.replace(e, metrics={m: Summary(s.samples[:first]) for m, s in e.metrics.items()})
                   for e in entries]  # fmt: skip
    return RunReport(fingerprint={"host": HOST}, results=list(entries), finished=True, source=f"{run.name}#{run.pair}")


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
        "rows": [{"metric": r.metric, "verdict": r.verdict, "ratio": r.ratio, "p": r.p_value, "mde": r.mde,
                  "units": r.units, "reason": r.reason} for r in comparison.rows],  # fmt: skip
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


def by_units(identical: list[tuple[Run, Run]], slow: list[tuple[Run, Run]], n: int, what: str, alpha: float) -> list[str]:
    lines = []
    for k in range(2 if what == "starts" else MIN_SAMPLES, n):
        false = sum(judge(a, b, alpha, k).regressed for a, b in identical)
        caught = sum(judge(a, b, alpha, k).regressed for a, b in slow)
        lines.append(f"  first {k} of {n} {what}: {false}/{len(identical)} false regressions, "
                     f"{caught}/{len(slow)} slow pairs caught")  # fmt: skip
    return lines


def mde_line(rows: list[dict[str, Any]]) -> str:
    mdes = [x["mde"] for r in rows for x in r["rows"] if x["metric"] == GEN_TOK_S.name and x.get("mde") is not None]
    if not mdes:
        return "  minimum detectable change in gen_tok_s: not computed"
    return (f"  minimum detectable change in {GEN_TOK_S} (80 % power): median {statistics.median(mdes):.1%}, "
            f"range {min(mdes):.1%}-{max(mdes):.1%}")  # fmt: skip


def goal_met(rows: list[dict[str, Any]], pairs: int) -> bool:
    false = sum(1 for r in rows if r["kind"] == "identical" and r["outcome"] == REGRESSED)
    caught = sum(1 for r in rows if r["kind"] == "slow" and r["outcome"] == REGRESSED)
    return false <= pairs // 20 and caught >= pairs - pairs // 20


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
                  f"{args.pairs} pairs each, {args.starts} fresh server(s) per side, R = {args.repetitions} "
                  f"(+{args.warmup} warmup), prompt "
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
        f"gate accuracy on {HOST['cpu']} ({HOST['cores']} cores), {args.starts} start(s) per side, "
        f"R = {args.repetitions}, default tolerances, "
        f"alpha {args.alpha:g}, B = {slow_text}",
        describe_pairs("identical", rows),
        describe_pairs("slow", rows),
        ratio_line("identical", identical),
        ratio_line("slow", slow),
        mde_line(rows),
        *(by_units(identical, slow, args.starts, "starts", args.alpha) if args.starts > 1
          else by_units(identical, slow, args.repetitions + 1, "repetitions", args.alpha)),
        f"  measurements on a busy host: {sum(r.busy for r in runs)} of {sum(len(r.entries) for r in runs)} starts",
        f"  1-minute load average after each run: median {statistics.median(loads):.2f}, max {max(loads):.2f}",
        f"  wall time {wall / 60:.1f} min ({len(runs)} sides of {args.starts} start(s), "
        f"{statistics.median(r.wall_s for r in runs):.1f} s each)",
        f"goal (<= {args.pairs // 20} false regressions, >= {args.pairs - args.pairs // 20}/{args.pairs} caught): "
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
        base, again, slowed = Run("A", i, [], 0.0, 0.0), Run("A'", i, [], 0.0, 0.0), Run("B", i, [], 0.0, 0.0)
        order = [(again, config_a), (slowed, config_b)]
        for start in range(args.starts):  # interleaved: A A' B, then A B A' on the next start or pair
            sides = [(base, config_a), *(order if (i + start) % 2 == 0 else order[::-1])]
            for run, config in sides:
                run_server(run, start + 1 if args.starts > 1 else 0, config, workload, binary, tmp / "logs",
                           busy=args.neighbour if run is again else None)  # fmt: skip
        runs += [base, again, slowed]
        identical.append((base, again))
        slow.append((base, slowed))
        same, slower = judge(base, again, args.alpha), judge(base, slowed, args.alpha)
        rows += [pair_row("identical", base, again, same), pair_row("slow", base, slowed, slower)]
        print(f"pair {i + 1:2d}/{args.pairs}: gen tok/s A {base.median():5.1f}  A' {again.median():5.1f}"
              f"  B {slowed.median():5.1f}   identical: {same.summary():<40}  slow: {slower.summary():<40}  "
              f"load {os.getloadavg()[0]:.2f}  {time.monotonic() - t0:.0f} s", flush=True)  # fmt: skip
    return runs, identical, slow, rows


if __name__ == "__main__":
    sys.exit(main())
