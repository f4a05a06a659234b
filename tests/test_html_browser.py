"""The HTML report in a real browser (headless Chromium): it loads without console errors and
every chart draws. Skipped with the reason where no Chromium is installed; required when
LLAMABENCH_REQUIRE_BROWSER=1 (CI here, .ci/run)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_llamabench.outputs import html
from pytest_llamabench.outputs.charts import PALETTE, charts
from pytest_llamabench.results import RunReport

from .browser import find_browser, has_colour, ink, load

REPO = Path(__file__).resolve().parent.parent
REPORTS = {"gpu": REPO / "docs" / "gpu-run" / "synthetic-matrix-16GiB.json", "cpu": REPO / "docs" / "default-run" / "report.json"}


@pytest.fixture(scope="module")
def browser() -> str:
    return find_browser()


@pytest.mark.parametrize("which", sorted(REPORTS))
def test_the_report_loads_without_console_messages_and_draws(browser: str, tmp_path: Path, which: str) -> None:
    page = html.write(RunReport.load(REPORTS[which]), tmp_path / "report.html")
    loaded = load(browser, page, tmp_path / "page.png", height=5000)
    assert loaded.console == []
    assert ink(loaded.screenshot) > 0.04  # text, tables and charts: not a blank page
    assert has_colour(loaded.screenshot, PALETTE[0]) > 2000  # the bars of the first workload (and more)


def test_every_chart_draws_on_its_own(browser: str, tmp_path: Path) -> None:
    for chart in charts(RunReport.load(REPORTS["gpu"])):
        page = tmp_path / f"{chart.name}.html"
        page.write_text(f'<!DOCTYPE html><html><head><meta charset="utf-8"></head><body style="margin:0">'
                        f"{chart.svg()}</body></html>")  # fmt: skip
        loaded = load(browser, page, tmp_path / f"{chart.name}.png", width=1400, height=900)
        assert loaded.console == [], chart.name
        assert ink(loaded.screenshot) > 0.005, f"{chart.name} is blank"  # an empty page: < 0.001
        assert has_colour(loaded.screenshot, PALETTE[0]) + has_colour(loaded.screenshot, PALETTE[1]) > 100, chart.name


def test_the_checks_catch_a_broken_page(browser: str, tmp_path: Path) -> None:
    """The two checks above can fail: a script error reaches the console, an empty page is blank."""
    broken = tmp_path / "broken.html"
    broken.write_text('<!DOCTYPE html><html><body><img src="missing.png"><script>notDefined()</script></body></html>')
    loaded = load(browser, broken, tmp_path / "broken.png", height=600)
    assert any("notDefined is not defined" in line for line in loaded.console)
    empty = tmp_path / "empty.html"
    empty.write_text("<!DOCTYPE html><html><body></body></html>")
    assert ink(load(browser, empty, tmp_path / "empty.png", height=600).screenshot) < 0.001
