"""``python -m pytest_llamabench html|winner REPORT.json``: the HTML page and the production
config, from a JSON report alone."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pytest_llamabench.outputs.production import FORMATS


def _html(args: argparse.Namespace) -> int:
    from pytest_llamabench.outputs import html
    from pytest_llamabench.results import RunReport

    report = RunReport.load(args.report)
    out = args.output or Path(args.report).with_suffix(".html")
    made = None
    if args.charts is not None:
        from pytest_llamabench.outputs.charts import write_charts

        made = {chart.name: chart for chart in write_charts(report, args.charts)}
        for name in made:
            print(args.charts / f"{name}.png")
    print(html.write(report, out, charts=made))
    return 0


def _winner(args: argparse.Namespace) -> int:
    from pytest_llamabench.outputs.production import production_config
    from pytest_llamabench.results import RunReport

    production = production_config(RunReport.load(args.report), args.config)
    print(production.render(args.format))
    return 0


def register(sub: Any) -> None:
    p = sub.add_parser("html", help="write the HTML report (charts inline, self-contained) of a JSON report")
    p.add_argument("report", type=Path, help="a JSON report written by pytest-llamabench")
    p.add_argument("-o", "--output", type=Path, help="the page to write (default: the report's path with .html)")
    p.add_argument("--charts", type=Path, metavar="DIR", help="also write each chart as PNG and SVG into DIR")
    p.set_defaults(func=_html)

    p = sub.add_parser("winner", help="print the winning config as a production command line, with its rationale")
    p.add_argument("report", type=Path, help="a JSON report written by pytest-llamabench")
    p.add_argument("--format", choices=FORMATS, default="cmd",
                   help="cmd: the llama-server command line; docker: docker run; compose: a docker compose "
                        "service; toml: a matrix file with this config alone")  # fmt: skip
    p.add_argument("--config", help="this config instead of the winner (e.g. the best of a tie)")
    p.set_defaults(func=_winner)


__all__ = ["register"]
