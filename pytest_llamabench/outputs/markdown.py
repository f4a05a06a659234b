"""The markdown report next to the JSON, also appended to the GitHub step summary.

``images`` are (title, path relative to the markdown file) of the charts written beside it:
the file shows them inline. A step summary cannot show local files (GitHub renders it on its
servers and strips data: URIs), so it names the chart files and, in a workflow run, links to the
run's page where uploaded artifacts are listed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pytest_llamabench.outputs.summary import append_step_summary


def write(path: Path, table: str, images: Sequence[tuple[str, str]] = ()) -> None:
    text = f"## llama-server benchmark\n\n{table}"
    path.write_text(text + "".join(f"\n![{title}]({ref})\n" for title, ref in images))
    append_step_summary(text + _charts_note(path, images))


def _charts_note(path: Path, images: Sequence[tuple[str, str]]) -> str:
    if not images:
        return ""
    files = ", ".join(f"`{ref}`" for _, ref in images)
    run = ""
    server, repo, run_id = (os.environ.get(k) for k in ("GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID"))
    if server and repo and run_id:
        run = f" ([this run's artifacts]({server}/{repo}/actions/runs/{run_id}#artifacts), when uploaded)"
    return (f"\n\nCharts (PNG and SVG) beside `{path.name}`: {files}; the HTML report "
            f"`{path.with_suffix('.html').name}` holds them all{run}.\n")
