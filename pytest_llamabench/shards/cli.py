"""``python -m pytest_llamabench merge a.json b.json … -o all.json``: one report from the
shards of several hosts, with the results table (printed, as markdown next to the JSON and
in $GITHUB_STEP_SUMMARY). Gate it like any report: ``python -m pytest_llamabench compare
BASE.json all.json``. Exit 0, or 2 on bad input (``__main__`` turns errors into 2)."""

from __future__ import annotations

import argparse
from pathlib import Path

from pytest_llamabench.outputs import markdown
from pytest_llamabench.outputs.table import render, speed_table
from pytest_llamabench.results import RunReport
from pytest_llamabench.shards.merge import merge_reports


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``merge`` subcommand to ``python -m pytest_llamabench``."""
    p = subparsers.add_parser(
        "merge",
        help="merge the JSON reports of several hosts (shards) into one",
        description="Merge reports of --llamabench-shard runs (or any runs of disjoint configs) into one report, "
        "refusing different GPU models, builds, models or CPUs unless --allow-mixed.",
    )
    p.add_argument("reports", type=Path, nargs="+", metavar="REPORT.json", help="the reports to merge")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="ALL.json", help="the merged report")
    p.add_argument("--allow-mixed", action="store_true",
                   help="merge reports of different GPU models, builds, models or CPUs (recorded in the report)")  # fmt: skip
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    merged = merge_reports([RunReport.load(p) for p in args.reports], allow_mixed=args.allow_mixed)
    partial = merged.interrupted or (None if merged.finished else "a shard's run did not finish")
    rows, workloads, verdict = speed_table(merged.per_unit(), partial=partial)  # as the run ranks: speed rows only; partial: no winner
    merged.extra["winner"] = verdict.as_dict()
    merged.write(args.output)
    if rows:
        markdown.write(args.output.with_suffix(".md"), render(rows, workloads, markdown=True, verdict=verdict))
        print(render(rows, workloads, verdict=verdict))
    hosts = merged.fingerprint["hosts"]
    print(f"merged {len(merged.results)} results of {len(hosts)} report(s) into {args.output}")
    return 0


__all__ = ["register", "run"]
