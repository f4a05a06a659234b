"""The README's result tables are generated from the committed run reports under docs/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_readme_tables_match_the_committed_reports() -> None:
    result = subprocess.run([sys.executable, str(REPO / "scripts/readme_tables.py"), "--check"],
                            capture_output=True, text=True, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr + result.stdout
