"""The HTML report: one self-contained page (inline CSS and SVG charts, no script, no CDN) made
from the JSON report alone.

The page is a list of sections, each a function ``(report, Page) -> html | None`` that draws
what the report holds and returns None when it holds nothing for it. Sections others add to the
report later (quality, sweeps, searches, concurrency, ...) show up without a change here: every
metric in the results gets a column in the metrics table, and every top-level key of the report
that no section claims is drawn by a generic renderer (tables of objects, lists, values).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pytest_llamabench.errors import LlamabenchError
from pytest_llamabench.metrics import METRICS
from pytest_llamabench.outputs.kinds import speed_results
from pytest_llamabench.outputs.table import WINNER_RULE, Row, speed_table
from pytest_llamabench.results import FAILING_OUTCOMES, ResultEntry, RunReport

#: Top-level report keys that are drawn by a section of their own (or are plumbing).
_CLAIMED = {"winner", "gate", "quality", "load"}

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0 auto;max-width:1200px;padding:1em 2em;color:#1b1b1b}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.2em;margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;margin:.6em 0;font-variant-numeric:tabular-nums}
th,td{border:1px solid #ddd;padding:.25em .6em;text-align:left;vertical-align:top}
td.n{text-align:right}th{background:#f4f4f4}
tr.winner td{background:#e8f5e9;font-weight:600}tr.fail td{color:#8a1c1c}
pre{background:#f6f8fa;border:1px solid #e1e4e8;padding:.7em;overflow-x:auto;white-space:pre-wrap;word-break:break-all}
figure{margin:1em 0}figure svg{max-width:100%;height:auto}figcaption{color:#555;font-size:.9em}
.meta{color:#555}.verdict{font-weight:600}.bad{color:#b00020}.good{color:#1b5e20}
dl{display:grid;grid-template-columns:max-content auto;gap:.1em 1em}dt{color:#555}dd{margin:0}
"""


@dataclasses.dataclass
class Page:
    """What the sections share: the report, its per-unit results, the table and the charts."""

    report: RunReport
    charts: Mapping[str, Any]  # chart name -> outputs.charts.Chart
    chart_error: str | None = None

    @functools.cached_property
    def units(self) -> list[ResultEntry]:
        return self.report.per_unit()

    @functools.cached_property
    def table(self) -> tuple[list[Row], list[str], Any]:
        units = speed_results(self.units)
        return speed_table(self.units, {u.config: u.description for u in units if u.config and u.description})

    def figure(self, name: str) -> str:
        chart = self.charts.get(name)
        if chart is None:
            return ""
        return (f'<figure id="chart-{_e(name)}" class="chart"><figcaption><b>{_e(chart.title)}</b></figcaption>'
                f"{chart.svg()}<figcaption>{_e(chart.caption)}</figcaption></figure>")  # fmt: skip


Section = Callable[[RunReport, Page], "str | None"]


# -- sections ---------------------------------------------------------------------------------


def _header(report: RunReport, page: Page) -> str:
    fp = report.fingerprint
    host = fp.get("host") or {}
    facts: dict[str, Any] = {
        "report": report.source,
        "started": report.started_at,
        "updated": report.updated_at,
        "state": "finished" if report.finished and not report.interrupted else f"partial ({report.interrupted or 'not finished'})",
        "matrix": ", ".join(report.matrix_files),
        "host": f"{host.get('cpu', '?')}, {host.get('cores', '?')} cores, {host.get('memory_mib', '?')} MiB" if host else None,
        "GPUs": ", ".join(f"{g.get('name')} ({g.get('memory_total_mib')} MiB)" for g in fp.get("gpus") or [] if isinstance(g, Mapping)),
        "VRAM budget": f"{fp['vram_budget_mib']} MiB" if fp.get("vram_budget_mib") else None,
        "llama.cpp": ", ".join(fp.get("llama_cpp_builds") or []),
        "models": ", ".join(f"{m.get('file')} ({m.get('size', 0) / 2**30:.2f} GiB)" for m in (fp.get("models") or {}).values()
                            if isinstance(m, Mapping)),
        "plugin": report.plugin_version,
    }  # fmt: skip
    return f"<h1>llama-server benchmark</h1>{_dl(facts)}"


def _winner(report: RunReport, page: Page) -> str | None:
    from pytest_llamabench.outputs.production import production_config, verdict_of

    verdict = verdict_of(report)
    parts = [f'<p class="verdict">{_e(verdict.get("line") or "")}</p>', f'<p class="meta">{_e(WINNER_RULE)}.</p>']
    try:
        production = production_config(report, verdict=verdict)
    except LlamabenchError as exc:
        parts.append(f'<p class="meta">No production config: {_e(exc.message)}</p>')
    else:
        parts.append(f"<h3>Production config: {_e(production.config)}</h3><pre>{_e(production.cmd())}</pre>")
        if production.image:
            parts.append(f"<p>In Docker:</p><pre>{_e(production.docker())}</pre>")
        parts.append("<ul>" + "".join(f"<li>{_e(line)}</li>" for line in production.rationale.lines()[:-1]) + "</ul>")
        parts.append('<p class="meta">Also: <code>python -m pytest_llamabench winner REPORT.json '
                     "--format cmd|docker|compose|toml</code>.</p>")  # fmt: skip
    return "<h2>Winner</h2>" + "".join(parts)


def _results(report: RunReport, page: Page) -> str | None:
    rows, workloads, _ = page.table
    if not rows:
        return None
    head = ["Config", *workloads, "RSS (MiB)", "VRAM (MiB)", "Status"]
    body = []
    for row in rows:
        cells = [row.config, *[f"{row.gen_tok_s[w]:.1f}" if w in row.gen_tok_s else "—" for w in workloads],
                 f"{row.rss_mib:.0f}" if row.rss_mib else "—", f"{row.vram_mib:.0f}" if row.vram_mib else "—", row.status]  # fmt: skip
        css = "winner" if row.winner else "fail" if any(o in FAILING_OUTCOMES for o in row.outcomes.values()) else ""
        body.append((css, cells))
    table = _table(head, body, title={r.config: r.description for r in rows})
    return f"<h2>Generation tok/s</h2>{table}{page.figure('tok_s')}"


def _memory(report: RunReport, page: Page) -> str | None:
    figure = page.figure("memory")
    return f"<h2>Memory</h2>{figure}" if figure else None


def _latency(report: RunReport, page: Page) -> str | None:
    figures = page.figure("ttft") + page.figure("itl")
    return f"<h2>Latency</h2>{figures}" if figures else None


def _metrics(report: RunReport, page: Page) -> str | None:
    """Every metric of every result (medians), known to metrics.py or not."""
    names = list(dict.fromkeys(n for u in page.units for n in u.metrics))
    if not names:
        return None
    names.sort(key=lambda n: list(METRICS).index(n) if n in METRICS else len(METRICS))
    head = ["Config", "Workload", "Outcome", *[f"{n} ({METRICS[n].unit})" if n in METRICS else n for n in names]]
    body = [("", [u.config or u.test, u.workload or "", u.outcome_text,
                  *[_num(u.peak(n) if n in METRICS and METRICS[n].peak else u.median(n)) for n in names]])
            for u in page.units]  # fmt: skip
    return f"<h2>All metrics (medians; peaks for memory)</h2>{_table(head, body)}"


def _quality(report: RunReport, page: Page) -> str | None:
    section = report.extra.get("quality")
    per_result = {(u.config, u.workload): u.extra["quality"] for u in page.units if u.extra.get("quality") is not None}
    if section is None and not per_result:
        return None
    parts = ["<h2>Quality</h2>", page.figure("quality")]
    if section is not None:
        parts.append(_value(section))
    if per_result:
        rows = [{"config": c, "workload": w, **(q if isinstance(q, Mapping) else {"quality": q})} for (c, w), q in per_result.items()]
        parts.append(_value(rows))
    return "".join(parts)


def _sweeps(report: RunReport, page: Page) -> str | None:
    figure = page.figure("sweeps")
    return f"<h2>Sweeps</h2>{figure}" if figure else None


def _load(report: RunReport, page: Page) -> str | None:
    figure = page.figure("load")
    curves = report.extra.get("load")
    if not figure and not curves:
        return None
    knees = [{"config": c.get("config"), "workload": c.get("workload"),
              **{f"knee ({k.get('series')})": k.get("level") or k.get("why") for k in c.get("knees") or [] if isinstance(k, Mapping)}}
             for c in curves or [] if isinstance(c, Mapping)]  # fmt: skip
    return f"<h2>Concurrent load</h2>{figure}{_value(knees) if knees else ''}"


def _gate(report: RunReport, page: Page) -> str | None:
    gate = report.gate
    if not gate:
        return None
    regressed = bool(gate.get("regressed"))
    parts = [f"<h2>Regression gate</h2><p>Baseline <code>{_e(gate.get('baseline'))}</code>: "
             f'<span class="{"bad" if regressed else "good"}">{_e(gate.get("summary"))}</span></p>']  # fmt: skip
    rows = gate.get("rows")
    if isinstance(rows, list) and rows:
        head = ["Config", "Workload", "Metric", "Base", "New", "Ratio", "95% CI", "p", "Detects ≥", "Verdict", "Note"]
        body = []
        for row in rows:
            if not isinstance(row, Mapping):
                continue
            ci = row.get("ci")
            cells = [row.get("config"), row.get("workload"), row.get("metric"),
                     _num(row.get("base_median")) if row.get("metric") != "outcome" else row.get("base_outcome"),
                     _num(row.get("new_median")) if row.get("metric") != "outcome" else row.get("new_outcome"),
                     _num(row.get("ratio"), 3), f"{ci[0]:.3f}–{ci[1]:.3f}" if isinstance(ci, list) and len(ci) == 2 else "—",
                     _num(row.get("p_value"), 3), f"{row['mde']:.0%}" if isinstance(row.get("mde"), (int, float)) else "—",
                     row.get("verdict"), row.get("reason")]  # fmt: skip
            body.append(("fail" if row.get("verdict") == "regressed" else "", [str(c if c is not None else "—") for c in cells]))
        parts.append(_table(head, body))
    return "".join(parts)


def _failures(report: RunReport, page: Page) -> str | None:
    failed = [r for r in report.results if r.failure is not None or (r.outcome in FAILING_OUTCOMES)]
    if not failed:
        return None
    body = [("fail" if r.outcome in FAILING_OUTCOMES else "",
             [r.test, r.outcome_text, r.failure.message if r.failure else (r.reason or "")]) for r in failed]  # fmt: skip
    return f"<h2>Failures and expected failures</h2>{_table(['Test', 'Outcome', 'Why'], body)}"


def _others(report: RunReport, page: Page) -> str | None:
    """Top-level sections of the report that no section above draws (added by newer features)."""
    extra = {k: v for k, v in report.extra.items() if k not in _CLAIMED and v not in (None, {}, [])}
    if not extra:
        return None
    return "".join(f"<h2>{_e(key.replace('_', ' ').capitalize())}</h2>{_value(value)}" for key, value in extra.items())


def _charts_note(report: RunReport, page: Page) -> str | None:
    return f'<p class="meta">Charts could not be drawn: {_e(page.chart_error)}</p>' if page.chart_error else None


#: The page, top to bottom.
SECTIONS: tuple[Section, ...] = (_header, _charts_note, _winner, _results, _memory, _latency, _quality, _sweeps,
                                 _load, _gate, _failures, _metrics, _others)  # fmt: skip


def render(report: RunReport, charts: Mapping[str, Any] | None = None, chart_error: str | None = None) -> str:
    """The whole page for ``report``; ``charts`` (name -> ``charts.Chart``) drawn already, else drawn now."""
    if charts is None:
        try:
            from pytest_llamabench.outputs.charts import charts as draw

            charts = {chart.name: chart for chart in draw(report)}
        except ImportError as exc:  # matplotlib missing from a broken install: the tables still say it all
            charts, chart_error = {}, f"{exc}; install matplotlib (pip install pytest-llamabench)"
    page = Page(report, charts, chart_error)
    body = "\n".join(part for section in SECTIONS if (part := section(report, page)))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>llama-server benchmark · {_e(Path(report.source).name)}</title><style>{_CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n")  # fmt: skip


def write(report: RunReport, path: Path, charts: Mapping[str, Any] | None = None, chart_error: str | None = None) -> Path:
    """Write the page atomically (a reader never sees half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(render(report, charts, chart_error), encoding="utf-8")
    tmp.replace(path)
    return path


# -- small renderers ----------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _num(value: object, digits: int = 1) -> str:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return "—"
    if digits > 1:
        return f"{value:.{digits}g}"
    return f"{value:.1f}" if abs(value) < 10000 else f"{value:.0f}"


def _table(head: Sequence[str], body: Sequence[tuple[str, Sequence[object]]], title: Mapping[str, str] | None = None) -> str:
    rows = []
    for css, cells in body:
        tip = (title or {}).get(str(cells[0]), "") if cells else ""
        first = (f'<td title="{_e(tip)}">{_e(cells[0])}</td>' if tip else f"<td>{_e(cells[0])}</td>") if cells else ""
        rest = "".join(f'<td class="n">{_e(c)}</td>' if _numeric(c) else f"<td>{_e(c)}</td>" for c in cells[1:])
        rows.append(f'<tr class="{css}">{first}{rest}</tr>' if css else f"<tr>{first}{rest}</tr>")
    return f"<table><thead><tr>{''.join(f'<th>{_e(h)}</th>' for h in head)}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _numeric(cell: object) -> bool:
    text = str(cell).rstrip("%")
    try:
        float(text)
    except ValueError:
        return text == "—"
    return True


def _dl(facts: Mapping[str, Any]) -> str:
    items = "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in facts.items() if v not in (None, ""))
    return f"<dl>{items}</dl>"


def _value(value: object) -> str:
    """Any JSON value, readably: a list of objects is a table, an object a list of facts."""
    if isinstance(value, list) and value and all(isinstance(v, Mapping) for v in value):
        keys = list(dict.fromkeys(k for v in value for k in v))
        return _table(keys, [("", [_cell(v.get(k)) for k in keys]) for v in value])
    if isinstance(value, Mapping):
        if value and all(isinstance(v, Mapping) for v in value.values()):
            keys = list(dict.fromkeys(k for v in value.values() for k in v))
            return _table(["", *keys], [("", [name, *[_cell(v.get(k)) for k in keys]]) for name, v in value.items()])
        return _dl({str(k): _cell(v) for k, v in value.items()})
    return f"<p>{_e(_cell(value))}</p>"


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (Mapping, list)):
        return json.dumps(value, default=str)[:300]
    return "—" if value is None else str(value)


__all__ = ["SECTIONS", "render", "write"]
