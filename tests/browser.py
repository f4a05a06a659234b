"""Headless Chromium for tests: load a page, screenshot it, collect its console messages.

Chromium's own logging (``--enable-logging=stderr --v=0``) prints every console message of the
page as ``INFO:CONSOLE(line)] "text", source: URL (line)`` (uncaught exceptions and failed
resource loads included), so no DevTools client is needed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_CONSOLE = re.compile(r":CONSOLE[:(]\d*\)?\]\s*(.*)$")


def find_browser() -> str:
    """The browser's path; skips the test without one, fails when LLAMABENCH_REQUIRE_BROWSER=1."""
    for name in _NAMES:
        path = shutil.which(name)
        if path:
            return path
    message = f"no headless Chromium on PATH (looked for {', '.join(_NAMES)}); on Debian: apt-get install -y chromium"
    if os.environ.get("LLAMABENCH_REQUIRE_BROWSER", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{message}; LLAMABENCH_REQUIRE_BROWSER is set", pytrace=False)
    pytest.skip(message)


@dataclasses.dataclass(frozen=True)
class Loaded:
    screenshot: Path
    console: list[str]


def load(browser: str, page: Path, out: Path, width: int = 1280, height: int = 2400) -> Loaded:
    """Load ``page`` in a fresh headless profile; its screenshot and console messages."""
    with tempfile.TemporaryDirectory(prefix="llamabench-chromium-") as profile:
        done = subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-extensions", f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0",
             f"--window-size={width},{height}", f"--screenshot={out}", page.resolve().as_uri()],
            capture_output=True, text=True, timeout=120, check=False, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    if done.returncode != 0 or not out.exists():
        raise AssertionError(f"chromium failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    console = [m.group(1) for line in done.stderr.splitlines() if (m := _CONSOLE.search(line))]
    return Loaded(out, console)


def _pixels(png: Path) -> Any:
    import numpy
    from PIL import Image

    with Image.open(png) as image:
        return numpy.asarray(image.convert("RGB"), dtype=numpy.int16)


def ink(png: Path, background: tuple[int, int, int] = (255, 255, 255)) -> float:
    """The fraction of pixels that differ from the page background."""
    pixels = _pixels(png)
    return float((abs(pixels - background).max(axis=2) > 15).mean())


def has_colour(png: Path, colour: str, tolerance: int = 24) -> int:
    """How many pixels are within ``tolerance`` of ``colour`` (``#RRGGBB``)."""
    target = [int(colour[i:i + 2], 16) for i in (1, 3, 5)]
    return int((abs(_pixels(png) - target).max(axis=2) <= tolerance).sum())
