"""The markdown report next to the JSON, also appended to the GitHub step summary."""

from __future__ import annotations

from pathlib import Path

from pytest_llamabench.outputs.summary import append_step_summary


def write(path: Path, table: str) -> None:
    text = f"## llama-server benchmark\n\n{table}"
    path.write_text(text)
    append_step_summary(text)
