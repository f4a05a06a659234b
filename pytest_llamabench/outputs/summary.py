"""The GitHub Actions job summary: markdown appended to ``$GITHUB_STEP_SUMMARY``."""

from __future__ import annotations

import os
import sys


def append_step_summary(markdown: str) -> None:
    """Append ``markdown`` and a newline to $GITHUB_STEP_SUMMARY when that is set.

    A summary that cannot be written is a warning on stderr, never a failure of the run.
    """
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as summary:
            summary.write(markdown + "\n")
    except OSError as exc:
        print(f"warning: cannot append to GITHUB_STEP_SUMMARY {path}: {exc}", file=sys.stderr)


__all__ = ["append_step_summary"]
