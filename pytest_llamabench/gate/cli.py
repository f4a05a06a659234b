"""``python -m pytest_llamabench compare BASE.json NEW.json``: the regression gate for CI.

Prints the comparison (text or ``--markdown``), appends it to the GitHub step summary,
and exits 0, 1 on any regression, 2 on bad input (``__main__`` turns errors into 2).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from pytest_llamabench.gate.fingerprint import FINGERPRINT_POLICIES
from pytest_llamabench.gate.tolerances import METRIC_RE, ToleranceRule, Tolerances, parse_tolerance
from pytest_llamabench.gate.render import render
from pytest_llamabench.gate.verdicts import Comparison, compare, load_report
from pytest_llamabench.metrics import DEFAULT_TOLERANCES, GEN_TOK_S, TTFT_MS
from pytest_llamabench.outputs.summary import append_step_summary

_DEFAULTS_HELP = " ".join(DEFAULT_TOLERANCES).replace("%", "%%")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add the ``compare`` subcommand to ``python -m pytest_llamabench``."""
    p = subparsers.add_parser(
        "compare",
        help="compare two JSON reports (regression gate for CI)",
        description="Compare NEW against BASE; exit 1 on any regression, 2 on bad input.",
    )
    p.add_argument("base", type=Path, metavar="BASE.json", help="the baseline report")
    p.add_argument("new", type=Path, metavar="NEW.json", help="the report to judge")
    p.add_argument("--tolerance", action="append", type=_cli_tolerance, default=[],
                   metavar="[CONFIG/[WORKLOAD/]]METRIC:±N[%]",
                   help=f"allowed change (repeatable); defaults: {_DEFAULTS_HELP}")  # fmt: skip
    p.add_argument("--alpha", type=_alpha, default=0.05, help="significance level (default 0.05)")
    p.add_argument("--fingerprint", choices=FINGERPRINT_POLICIES, default="refuse",
                   help="when the reports come from different setups: refuse (default) or warn")  # fmt: skip
    p.add_argument("--markdown", action="store_true", help="print a markdown table")
    p.add_argument("--metrics", type=_metric_list, help="comma-separated metrics (default: all with a tolerance)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """The ``compare`` command: print the table, write the step summary, gate on regressions."""
    comparison = compare(
        load_report(args.base),
        load_report(args.new),
        tolerances=Tolerances(args.tolerance),
        alpha=args.alpha,
        fingerprint=args.fingerprint,
        metrics=args.metrics,
    )
    print(render(comparison, "markdown" if args.markdown else "text"), end="")
    write_step_summary(comparison)
    return 1 if comparison.regressed else 0


def write_step_summary(comparison: Comparison) -> None:
    """Append the markdown table to $GITHUB_STEP_SUMMARY when that is set."""
    append_step_summary(render(comparison, "markdown"))


def _cli_tolerance(text: str) -> ToleranceRule:
    """``compare --tolerance``: argparse already names the flag."""
    return parse_tolerance(text, where="")


def _alpha(text: str) -> float:
    try:
        alpha = float(text)
    except ValueError:
        alpha = math.nan
    if not 0 < alpha < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a significance level; use a number in (0, 1), e.g. 0.05")
    return alpha


def _metric_list(text: str) -> list[str]:
    metrics = [m.strip() for m in text.split(",") if m.strip()]
    bad = [m for m in metrics if not METRIC_RE.match(m)]
    if not metrics or bad:
        raise argparse.ArgumentTypeError(f"{text!r} is not a metric list; write e.g. {GEN_TOK_S},{TTFT_MS}")
    return metrics


__all__ = ["register", "run", "write_step_summary"]
