"""The HTML report and the charts, from committed reports (docs/) and reports with sections
this version does not know."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest

from pytest_llamabench.__main__ import main
from pytest_llamabench.outputs import html
from pytest_llamabench.outputs.charts import charts, sweeps
from pytest_llamabench.outputs.pictures import write_pictures
from pytest_llamabench.results import RunReport

REPO = Path(__file__).resolve().parent.parent
GPU_REPORT = REPO / "docs" / "gpu-run" / "synthetic-matrix-16GiB.json"
CPU_REPORT = REPO / "docs" / "default-run" / "report.json"


def _data(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def test_the_page_has_every_chart_inline_and_nothing_from_outside() -> None:
    page = html.render(RunReport.load(GPU_REPORT))
    assert page.startswith("<!DOCTYPE html>")
    for name in ("tok_s", "memory", "ttft", "itl", "sweeps"):
        assert f'id="chart-{name}"' in page
    assert page.count("<svg") == 5
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', page)  # self-contained: no CDN, no remote fonts
    assert "<script" not in page
    # every inline SVG's ids are unique on the page (matplotlib salts them per chart)
    ids = re.findall(r'<[^>]+\sid="([^"]+)"', page)
    assert len(ids) == len(set(ids))


def test_the_page_holds_the_table_the_winner_and_failures() -> None:
    page = html.render(RunReport.load(GPU_REPORT))
    assert '<tr class="winner"><td title="Q4_K_M, --n-cpu-moe 24 (24 on GPU)">C7</td><td class="n">72.3</td>' in page
    assert "Production config: C7" in page and "--n-cpu-moe 24" in page
    assert "expected OOM (gpu 20866 MiB, model)" in page
    assert "VRAM 13412 MiB of 16384 MiB budget (82%)" in page


def test_a_tie_says_so_and_names_no_production_config() -> None:
    report = RunReport.load(CPU_REPORT)
    verdict = report.extra["winner"]  # the committed main-job run ended in a tie
    assert verdict["winner"] is None and verdict["runner_up"], verdict
    page = html.render(report)
    assert f"tie within noise: {verdict['best']} ≈ {verdict['runner_up']}" in page
    assert "No production config:" in page and f"--config {verdict['best']}" in page


def test_the_memory_chart_draws_the_budget_and_the_ooms() -> None:
    made = {c.name: c for c in charts(RunReport.load(GPU_REPORT))}
    svg = made["memory"].svg()
    assert "VRAM budget 16384 MiB" in svg
    assert "VRAM that failed to allocate (OOM)" in svg
    assert "peak RSS" in svg and "peak VRAM" in svg


def test_sweeps_are_found_within_one_model_only() -> None:
    found = sweeps(RunReport.load(GPU_REPORT))
    # C2, C2a, C2b are the Q8_0 --n-cpu-moe sweep; C6 and C7 (Q4_K_M) are another model's
    assert [(s.key, [c for _, c in s.points]) for s in found] == [("n-cpu-moe", ["C2", "C2a", "C2b"])]


def test_recorded_sweep_points_win_over_inferred_ones() -> None:
    data = copy.deepcopy(_data(GPU_REPORT))
    for result in data["results"]:
        if result["config"] in ("C5", "C7"):
            result["sweep"] = {"sweep": "Q4", "values": {"n_cpu_moe": 48 if result["config"] == "C5" else 24}}
    found = sweeps(RunReport.from_dict(data))
    assert [(s.name, s.key, [c for _, c in s.points]) for s in found] == [("Q4", "n_cpu_moe", ["C7", "C5"])]


def test_sections_and_metrics_added_later_are_drawn() -> None:
    data = copy.deepcopy(_data(CPU_REPORT))
    data["concurrency"] = [{"config": "base", "clients": 4, "throughput_tok_s": 123.4}]
    data["search"] = {"C7": {"goal": "fastest-that-fits", "found": 24}}
    data["results"][0]["metrics"]["kv_hit_pct"] = {"median": 42.0, "samples": [42.0]}
    page = html.render(RunReport.from_dict(data, source="report.json"))
    assert "<h2>Concurrency</h2>" in page and '<td class="n">123.4</td>' in page
    assert "<h2>Search</h2>" in page and "fastest-that-fits" in page
    assert "<th>kv_hit_pct</th>" in page and '<td class="n">42.0</td>' in page


def test_the_quality_section_and_the_gate_rows_with_intervals() -> None:
    data = copy.deepcopy(_data(CPU_REPORT))
    data["quality"] = [{"config": "q8", "model_file": "m-q8.gguf", "ppl": 6.5342, "ppl_error": 0.04, "verdict": "Reference"},
                       {"config": "q4", "model_file": "m.gguf", "ppl": 6.6688, "increase_pct": 2.06, "verdict": "RECOMMENDED"}]
    data["gate"] = {"baseline": "base.json", "regressed": True, "summary": "1 regressed",
                    "rows": [{"config": "base", "workload": "short", "metric": "gen_tok_s", "verdict": "regressed",
                              "base_median": 80.5, "new_median": 70.1, "ratio": 0.871, "ci": [0.82, 0.91],
                              "p_value": 0.008, "mde": 0.07, "reason": ""}]}  # fmt: skip
    page = html.render(RunReport.from_dict(data))
    assert "<h2>Quality</h2>" in page and "RECOMMENDED" in page and "6.669" in page
    assert 'id="chart-quality"' in page and "RECOMMENDED  +2.1%" in page
    assert "<h2>Regression gate</h2>" in page and "0.820–0.910" in page and "7%" in page
    assert '<tr class="fail"><td>base</td><td>short</td><td>gen_tok_s</td>' in page


def test_a_partial_report_without_measurements_still_renders() -> None:
    data = {"schema_version": 1, "finished": False, "interrupted": "Ctrl-C", "results": [
        {"test": "t[a-short]", "config": "a", "workload": "short", "outcome": "error",
         "failure": {"kind": "not-ready", "message": "not ready within 1 s"}, "metrics": {}}]}  # fmt: skip
    page = html.render(RunReport.from_dict(data))
    assert "partial (Ctrl-C)" in page and "not ready within 1 s" in page
    assert "<svg" not in page


def test_pictures_beside_the_markdown(tmp_path: Path) -> None:
    images = write_pictures(RunReport.load(GPU_REPORT), tmp_path / "report.html", tmp_path / "report.md", log=print)
    assert [ref for _, ref in images] == [f"report-charts/{n}.png" for n in ("tok_s", "memory", "ttft", "itl", "sweeps")]
    for _, ref in images:
        png = (tmp_path / ref).read_bytes()
        assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 5000
        assert (tmp_path / ref).with_suffix(".svg").read_text().startswith("<svg")
    assert (tmp_path / "report.html").read_text().count("<svg") == 5


def test_a_chart_that_fails_costs_the_charts_not_the_page(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_llamabench.outputs import charts as charts_module

    def broken(report: RunReport) -> None:
        raise ValueError("bad data")

    monkeypatch.setattr(charts_module, "CHARTS", (broken,))
    logged: list[str] = []
    assert write_pictures(RunReport.load(GPU_REPORT), tmp_path / "r.html", tmp_path / "r.md", log=logged.append) == []
    assert logged == ["could not draw the charts (ValueError: bad data); the HTML report has the tables only"]
    assert "Charts could not be drawn: ValueError: bad data" in (tmp_path / "r.html").read_text()


def test_cli_html(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out.html"
    assert main(["html", str(GPU_REPORT), "-o", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert out.read_text().count("<svg") == 5
    assert main(["html", str(GPU_REPORT), "-o", str(out), "--charts", str(tmp_path / "charts")]) == 0
    assert capsys.readouterr().out.splitlines()[0] == str(tmp_path / "charts" / "tok_s.png")
    assert sorted(p.name for p in (tmp_path / "charts").iterdir())[:2] == ["itl.png", "itl.svg"]
    (tmp_path / "bad.json").write_text("{}")
    assert main(["html", str(tmp_path / "bad.json")]) == 2
    assert "not a pytest-llamabench report" in capsys.readouterr().err


def test_concurrent_load_curves_are_drawn() -> None:
    from pytest_llamabench.metrics import AGG_TOK_S as agg
    from pytest_llamabench.metrics import E2E_P99_MS as e2e

    data = copy.deepcopy(_data(CPU_REPORT))
    data["load"] = [{"config": "base", "workload": "load", "knees": [{"series": "closed loop", "level": "c4", "why": ""}],
                     "points": [{"level": f"c{n}", "closed_loop": True, "medians": {agg.name: 50.0 * n ** 0.5,
                                                                                  e2e.name: 900.0 * n}}
                                for n in (1, 2, 4, 8)]}]  # fmt: skip
    page = html.render(RunReport.from_dict(data))
    assert 'id="chart-load"' in page and "base/load (streams)" in page
    assert "<h2>Concurrent load</h2>" in page and "knee (closed loop)" in page


def test_the_markdown_shows_the_charts_and_the_step_summary_names_them(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_llamabench.outputs import markdown

    summary = tmp_path / "summary.md"
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    monkeypatch.setenv("GITHUB_SERVER_URL", "https://github.com")
    monkeypatch.setenv("GITHUB_REPOSITORY", "o/r")
    monkeypatch.setenv("GITHUB_RUN_ID", "42")
    markdown.write(tmp_path / "report.md", "| a |\n", [("Generation tok/s", "report-charts/tok_s.png")])
    assert "![Generation tok/s](report-charts/tok_s.png)" in (tmp_path / "report.md").read_text()
    text = summary.read_text()
    assert "![" not in text  # GitHub cannot show a runner's local files in a step summary
    assert "`report-charts/tok_s.png`" in text and "https://github.com/o/r/actions/runs/42#artifacts" in text
