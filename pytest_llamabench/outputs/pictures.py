"""The pictures of a run: the charts (SVG and PNG) beside the markdown and the HTML page,
drawn once from the report at the end of a run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from pytest_llamabench.results import RunReport


def charts_dir(markdown_path: Path) -> Path:
    """``report.md`` -> ``report-charts/``."""
    return markdown_path.with_name(f"{markdown_path.stem}-charts")


def write_pictures(report: RunReport, html_path: Path, markdown_path: Path,
                   log: Callable[[str], None] = print) -> list[tuple[str, str]]:  # fmt: skip
    """Charts into ``charts_dir(markdown_path)`` and the page at ``html_path``; (title, path of the
    PNG relative to the markdown) of each chart. A chart that cannot be drawn costs the charts (one
    line says why), never the page or the run."""
    from pytest_llamabench.outputs import html

    made: dict[str, object] = {}
    images: list[tuple[str, str]] = []
    error = None
    try:
        from pytest_llamabench.outputs.charts import charts

        directory = charts_dir(markdown_path)
        for chart in charts(report):
            chart.write(directory)
            made[chart.name] = chart
            images.append((chart.title, f"{directory.name}/{chart.name}.png"))
    except Exception as exc:  # noqa: BLE001 - the report and the tables matter more than a picture
        error = f"{type(exc).__name__}: {exc}"
        log(f"could not draw the charts ({error}); the HTML report has the tables only")
        made, images = {}, []
    html.write(report, html_path, charts=made, chart_error=error)
    return images


__all__ = ["charts_dir", "write_pictures"]
