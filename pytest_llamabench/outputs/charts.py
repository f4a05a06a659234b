"""Charts of a run, drawn with matplotlib from the report alone (``RunReport``).

Each chart is a function ``report -> Figure | None`` (None: the report has nothing to draw for
it), listed in ``CHARTS``. Figures are made with ``matplotlib.figure.Figure`` directly (no pyplot:
no global state, no GUI backend) and written as SVG (inline in the HTML page, beside the
markdown) or PNG. SVG ids are salted per chart so that several inline SVGs on one page never
share an id.
"""

from __future__ import annotations

import dataclasses
import io
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from pytest_llamabench.metrics import (
    AGG_TOK_S, E2E_P99_MS, GEN_TOK_S, ITL_P50_MS, ITL_P90_MS, ITL_P99_MS, RSS_PEAK_MIB, TTFT_MS, VRAM_PEAK_MIB,
)  # fmt: skip
from pytest_llamabench.outputs.kinds import speed_results
from pytest_llamabench.results import ResultEntry, RunReport

#: Colour-blind-safe palette (Okabe-Ito), one colour per workload or series.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
_RC: Any = {"svg.fonttype": "none", "font.size": 9, "axes.spines.top": False, "axes.spines.right": False}


@dataclasses.dataclass
class Chart:
    name: str  # file stem and SVG id salt
    title: str
    caption: str
    figure: Figure
    _svg: str | None = dataclasses.field(default=None, repr=False)

    def svg(self) -> str:
        """The chart as an SVG document without the XML prolog (for inline use); drawn once."""
        if self._svg is None:
            import matplotlib

            buffer = io.StringIO()
            with matplotlib.rc_context({**_RC, "svg.hashsalt": f"llamabench-{self.name}"}):
                self.figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
            text = buffer.getvalue()
            self._svg = _scoped_ids(text[text.index("<svg"):], f"{self.name}-")
        return self._svg

    def write(self, directory: Path) -> list[Path]:
        """``NAME.svg`` and ``NAME.png`` in ``directory``."""
        import matplotlib

        directory.mkdir(parents=True, exist_ok=True)
        svg, png = directory / f"{self.name}.svg", directory / f"{self.name}.png"
        svg.write_text(self.svg(), encoding="utf-8")
        with matplotlib.rc_context(_RC):
            self.figure.savefig(png, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
        return [svg, png]


def _scoped_ids(svg: str, prefix: str) -> str:
    """Every id of an SVG, and every reference to one, prefixed: matplotlib names elements
    ``figure_1``, ``axes_1``, ... in every figure, and inline SVGs share the page's ids."""
    svg = re.sub(r'\bid="', f'id="{prefix}', svg)
    svg = re.sub(r"url\(#", f"url(#{prefix}", svg)
    return re.sub(r'href="#', f'href="#{prefix}', svg)


def _figure(width: float, height: float) -> Figure:
    import matplotlib

    with matplotlib.rc_context(_RC):
        return Figure(figsize=(width, height), layout="constrained")


def _configs(units: Sequence[ResultEntry]) -> list[str]:
    return list(dict.fromkeys(u.config for u in units if u.config))


def _workloads(units: Sequence[ResultEntry]) -> list[str]:
    return list(dict.fromkeys(u.workload for u in units if u.workload))


def _why_missing(units: Sequence[ResultEntry], config: str) -> str:
    for unit in units:
        if unit.config == config and unit.failure is not None:
            return "OOM" if unit.failure.kind == "oom" else unit.failure.kind
    outcome = next((u.outcome for u in units if u.config == config and u.outcome), None)
    return outcome or "—"


# -- the charts ----------------------------------------------------------------------


def tok_s_chart(report: RunReport) -> Chart | None:
    """Median generation tok/s per config × workload; whiskers: min–max of the unit samples."""
    units = speed_results(report.per_unit())
    configs, workloads = _configs(units), _workloads(units)
    cells = {(u.config, u.workload): u for u in units if u.median(GEN_TOK_S.name) is not None}
    if not cells:
        return None
    fig = _figure(min(14.0, max(6.0, 0.5 * len(configs) * max(1, len(workloads)) ** 0.5 + 2)), 3.6)
    ax = fig.add_subplot()
    width = 0.8 / max(len(workloads), 1)
    top = max(max(u.samples(GEN_TOK_S.name) or (u.median(GEN_TOK_S.name) or 0.0,)) for u in cells.values())
    for j, workload in enumerate(workloads):
        xs, heights, low, high = [], [], [], []
        for i, config in enumerate(configs):
            unit = cells.get((config, workload))
            if unit is None:
                continue
            median = unit.median(GEN_TOK_S.name) or 0.0
            samples = unit.samples(GEN_TOK_S.name) or (median,)
            xs.append(i - 0.4 + width * (j + 0.5))
            heights.append(median)
            low.append(median - min(samples))
            high.append(max(samples) - median)
        ax.bar(xs, heights, width * 0.92, yerr=[low, high], capsize=2, label=workload, color=PALETTE[j % len(PALETTE)],
               error_kw={"elinewidth": 0.8, "ecolor": "#333333"})  # fmt: skip
    for i, config in enumerate(configs):
        if not any((config, w) in cells for w in workloads):  # never ran: say why, where its bars would be
            ax.text(i, top * 0.03, _why_missing(units, config), ha="center", va="bottom", rotation=90, color="#B00020")
    ax.set_xticks(range(len(configs)), configs, rotation=30 if len(configs) > 6 else 0, ha="right" if len(configs) > 6 else "center")
    ax.set_xlim(-0.6, len(configs) - 0.4)
    ax.set_ylabel("generation tok/s (median)")
    ax.set_ylim(0, top * 1.12 if top else 1)
    ax.legend(title="workload", ncols=min(len(workloads), 4), fontsize=8, loc="upper left", bbox_to_anchor=(0, 1.18),
              frameon=False)  # fmt: skip
    ax.grid(axis="y", alpha=0.3)
    starts = max((int(u.extra.get("starts", 1)) for u in units), default=1)
    what = "per-start medians" if starts > 1 else "repetitions of one server"
    return Chart("tok_s", "Generation tok/s per config and workload",
                 f"Bars: median; whiskers: min–max of the samples ({what}).", fig)  # fmt: skip


def memory_chart(report: RunReport) -> Chart | None:
    """Peak RSS and VRAM per config against the VRAM budget; OOMs drawn at the size that failed."""
    units = speed_results(report.per_unit())
    configs = _configs(units)
    series = {"RSS": RSS_PEAK_MIB.name, "VRAM": VRAM_PEAK_MIB.name}
    peaks: dict[str, dict[str, float]] = {name: {} for name in series}
    ooms: dict[str, tuple[str, float]] = {}
    for unit in units:
        if not unit.config:
            continue
        for name, metric in series.items():
            value = unit.peak(metric)
            if value is not None and value > 0:
                peaks[name][unit.config] = max(peaks[name].get(unit.config, 0.0), value)
        if unit.failure is not None and unit.failure.kind == "oom":
            requested = unit.failure.detail.get("requested_mib")
            device = "VRAM" if unit.failure.detail.get("device") == "gpu" else "RSS"
            if isinstance(requested, (int, float)) and requested > 0:
                ooms[unit.config] = (device, float(requested))
    shown = [name for name in series if peaks[name]]
    if not shown and not ooms:
        return None
    names = shown or ["RSS"]
    budget = report.fingerprint.get("vram_budget_mib")
    fig = _figure(max(6.0, 0.7 * len(configs) + 2), 3.4)
    ax = fig.add_subplot()
    width = 0.8 / len(names)
    for j, name in enumerate(names):
        colour = PALETTE[j]
        xs = [i - 0.4 + width * (j + 0.5) for i, c in enumerate(configs) if c in peaks[name]]
        ax.bar(xs, [peaks[name][c] for c in configs if c in peaks[name]], width * 0.92, label=f"peak {name}", color=colour)
        oom_x = [i - 0.4 + width * (j + 0.5) for i, c in enumerate(configs) if ooms.get(c, ("", 0))[0] == name]
        oom_y = [ooms[c][1] for c in configs if ooms.get(c, ("", 0))[0] == name]
        if oom_x:
            ax.bar(oom_x, oom_y, width * 0.92, fill=False, hatch="///", edgecolor="#B00020",
                   label=f"{name} that failed to allocate (OOM)")  # fmt: skip
    if isinstance(budget, (int, float)) and budget > 0 and ("VRAM" in names):
        ax.axhline(budget, color="#B00020", linestyle="--", linewidth=1, label=f"VRAM budget {budget:.0f} MiB")
    host = (report.fingerprint.get("host") or {}).get("memory_mib")
    if isinstance(host, (int, float)) and host > 0 and any(device == "RSS" for device, _ in ooms.values()):
        ax.axhline(host, color="#555555", linestyle=":", linewidth=1, label=f"host memory {host:.0f} MiB")
    heights = [v for series_peaks in peaks.values() for v in series_peaks.values()] + [v for _, v in ooms.values()]
    if heights and max(heights) / max(min(heights), 1.0) > 50:  # an OOM far beyond the rest: keep both readable
        ax.set_yscale("log")
    ax.set_xticks(range(len(configs)), configs, rotation=30 if len(configs) > 6 else 0, ha="right" if len(configs) > 6 else "center")
    ax.set_ylabel("MiB")
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(0, 1.2), ncols=2)
    ax.grid(axis="y", alpha=0.3)
    return Chart("memory", "Peak memory against the budget",
                 "Peak resident memory of the server (VmHWM or the container's cgroup peak) and its peak VRAM "
                 "(NVML); hatched: the allocation that failed, for configs that ran out of memory.", fig)  # fmt: skip


def ttft_chart(report: RunReport) -> Chart | None:
    """Time-to-first-token distributions: one panel per workload, one box per config."""
    return _distribution(report, TTFT_MS.name, "ttft", "Time to first token",
                         "Boxes: the repetitions of every server start (median, quartiles, whiskers 1.5 IQR).")  # fmt: skip


def itl_chart(report: RunReport) -> Chart | None:
    """Inter-token latency p50 / p90 / p99 (median over repetitions) per config and workload."""
    results = [r for r in speed_results(report.results) if r.config and r.workload and r.median(ITL_P50_MS.name) is not None]
    if not results:
        return None
    workloads = _workloads(results)
    configs = _configs(results)
    fig = _figure(max(6.0, 2.4 * len(workloads)), 2.8 + 0.08 * len(configs))
    axes = fig.subplots(1, len(workloads), sharey=True, squeeze=False)[0]
    for ax, workload in zip(axes, workloads):
        for k, (metric, marker) in enumerate(((ITL_P50_MS, "o"), (ITL_P90_MS, "s"), (ITL_P99_MS, "^"))):
            xs, ys = [], []
            for i, config in enumerate(configs):
                values = [v for r in results if r.config == config and r.workload == workload
                          and (v := r.median(metric.name)) is not None]  # fmt: skip
                if values:
                    xs.append(sorted(values)[len(values) // 2])
                    ys.append(i)
            ax.scatter(xs, ys, marker=marker, s=18, color=PALETTE[k], label=metric.name.split("_")[1])
        ax.set_title(workload, fontsize=9)
        ax.set_xlabel("ms")
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(configs)), configs)
    axes[0].invert_yaxis()
    axes[-1].legend(fontsize=8, frameon=False)
    return Chart("itl", "Inter-token latency", "Median over repetitions of each request's ITL p50, p90 and p99.", fig)


def _distribution(report: RunReport, metric: str, name: str, title: str, caption: str) -> Chart | None:
    results = [r for r in speed_results(report.results) if r.config and r.workload and r.samples(metric)]
    if not results:
        return None
    workloads, configs = _workloads(results), _configs(results)
    fig = _figure(max(6.0, 2.4 * len(workloads)), 2.8 + 0.08 * len(configs))
    axes = fig.subplots(1, len(workloads), squeeze=False)[0]
    for ax, workload in zip(axes, workloads):
        data, labels = [], []
        for config in configs:
            samples = [s for r in results if r.config == config and r.workload == workload for s in r.samples(metric)]
            if samples:
                data.append(samples)
                labels.append(config)
        ax.boxplot(data, orientation="horizontal", tick_labels=labels, widths=0.6,
                   medianprops={"color": PALETTE[1]}, flierprops={"markersize": 3})  # fmt: skip
        ax.invert_yaxis()
        ax.set_title(workload, fontsize=9)
        ax.set_xlabel("ms")
        ax.grid(axis="x", alpha=0.3)
    return Chart(name, title, caption, fig)


# -- sweep curves ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sweep:
    """Configs that differ in one numeric setting: a curve of speed (and VRAM) against it."""

    name: str
    key: str
    points: tuple[tuple[float, str], ...]  # (value, config)


def sweeps(report: RunReport) -> list[Sweep]:
    """Sweeps recorded in the results (``sweep = {"sweep": NAME, "values": {KEY: V}}``), else
    groups of configs whose server args differ in one numeric flag only (three or more values)."""
    units = [u for u in speed_results(report.per_unit()) if u.config]
    recorded: dict[tuple[str, str], dict[float, str]] = {}
    for unit in units:
        point = unit.extra.get("sweep")
        if isinstance(point, Mapping) and isinstance(point.get("values"), Mapping) and len(point["values"]) == 1:
            (key, value), = point["values"].items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and unit.config:
                recorded.setdefault((str(point.get("sweep")), str(key)), {})[float(value)] = unit.config
    if recorded:
        return [Sweep(n, k, tuple(sorted(p.items()))) for (n, k), p in recorded.items() if len(p) >= 2]
    args: dict[str, list[str]] = {}  # config -> the model file and its server args
    for unit in units:
        if unit.config and unit.server and isinstance(unit.server.get("args"), list) and unit.config not in args:
            args[unit.config] = [str((unit.model or {}).get("file")), *(str(a) for a in unit.server["args"])]
    groups: dict[tuple[str, tuple[str, ...]], dict[float, str]] = {}
    for config, argv in args.items():
        for i in range(len(argv) - 1):
            if argv[i].startswith("-") and re.fullmatch(r"-?\d+(\.\d+)?", argv[i + 1]):
                rest = tuple(argv[:i + 1] + ["<>"] + argv[i + 2:])
                groups.setdefault((argv[i], rest), {}).setdefault(float(argv[i + 1]), config)
    found = [Sweep(flag.lstrip("-"), flag.lstrip("-"), tuple(sorted(points.items())))
             for (flag, _), points in groups.items() if len(points) >= 3]  # fmt: skip
    return found


def sweep_chart(report: RunReport) -> Chart | None:
    found = sweeps(report)
    if not found:
        return None
    units: dict[str, list[ResultEntry]] = {}
    for unit in speed_results(report.per_unit()):
        if unit.config:
            units.setdefault(unit.config, []).append(unit)
    fig = _figure(max(5.0, 4.2 * len(found)), 3.2)
    axes = fig.subplots(1, len(found), squeeze=False)[0]
    for ax, sweep in zip(axes, found):
        xs, speeds, vram, failed = [], [], [], []
        for value, config in sweep.points:
            medians = [m for u in units.get(config, []) if (m := u.median(GEN_TOK_S.name)) is not None]
            if medians:
                xs.append(value)
                speeds.append(sum(medians) / len(medians))
                vram.append(max((v for u in units[config] if (v := u.peak(VRAM_PEAK_MIB.name))), default=None))
            else:
                failed.append((value, _why_missing(units.get(config, []), config)))
        ax.plot(xs, speeds, marker="o", color=PALETTE[0], label="mean generation tok/s")
        if sweep.points[-1][0] > 0 and sweep.points[0][0] > 0 and sweep.points[-1][0] / sweep.points[0][0] > 100:
            ax.set_xscale("log")
        ax.set_xlabel(sweep.key)
        ax.set_ylabel("tok/s", color=PALETTE[0])
        for value, why in failed:
            ax.axvline(value, color="#B00020", linestyle=":", linewidth=1)
            ax.annotate(why, (value, 0), xycoords=("data", "axes fraction"), rotation=90, va="bottom",
                        ha="right", color="#B00020", fontsize=8)  # fmt: skip
        if any(v is not None for v in vram):
            twin = ax.twinx()
            twin.plot([x for x, v in zip(xs, vram) if v], [v for v in vram if v], marker="s", linestyle="--",
                      color=PALETTE[1], label="peak VRAM (MiB)")  # fmt: skip
            twin.set_ylabel("VRAM MiB", color=PALETTE[1])
            twin.set_ylim(0, max(v for v in vram if v) * 1.12)
        ax.set_ylim(0, max(speeds, default=1.0) * 1.12)
        ax.set_title(sweep.key if sweep.name == sweep.key else f"{sweep.name}: {sweep.key}", fontsize=9)
        ax.grid(alpha=0.3)
    return Chart("sweeps", "Sweeps", "Mean generation tok/s over workloads (and peak VRAM) against the swept "
                 "setting; dotted lines: points that failed.", fig)  # fmt: skip


def load_chart(report: RunReport) -> Chart | None:
    """Concurrent load (the report's ``load`` curves): aggregate output tok/s against p99 end-to-end
    time, one line per config × workload and series (closed loop: streams; open loop: requests/s)."""
    agg, e2e = AGG_TOK_S, E2E_P99_MS
    curves = report.extra.get("load")
    if not isinstance(curves, list):
        return None
    series: list[tuple[str, list[tuple[float, float, str]]]] = []
    for curve in curves:
        points = curve.get("points") if isinstance(curve, Mapping) else None
        if not isinstance(points, list):
            continue
        for closed in (True, False):
            line = [(float(m[agg.name]), float(m[e2e.name]), str(p.get("level", ""))) for p in points
                    if isinstance(p, Mapping) and p.get("closed_loop") is closed and isinstance(m := p.get("medians"), Mapping)
                    and isinstance(m.get(agg.name), (int, float)) and isinstance(m.get(e2e.name), (int, float))]  # fmt: skip
            if line:
                series.append((f"{curve.get('config')}/{curve.get('workload')} ({'streams' if closed else 'req/s'})", line))
    if not series:
        return None
    fig = _figure(7.0, 3.8)
    ax = fig.add_subplot()
    for k, (label, line) in enumerate(series):
        ax.plot([x for x, _, _ in line], [y for _, y, _ in line], marker="o", color=PALETTE[k % len(PALETTE)], label=label)
        for x, y, level in line:
            ax.annotate(level, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel(f"{agg.label} ({agg.unit})")
    ax.set_ylabel(f"{e2e.label} ({e2e.unit})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, frameon=False)
    return Chart("load", "Throughput against latency",
                 "Each point is a load level (its label); medians over repetitions.", fig)  # fmt: skip


_VERDICT_COLOURS = {"Reference": "#777777", "RECOMMENDED": PALETTE[2], "NOT RECOMMENDED": "#B00020"}


def quality_chart(report: RunReport) -> Chart | None:
    """Quant quality (the report's ``quality`` rows): perplexity per model with its ± and the
    increase over the reference, coloured by verdict."""
    rows = [r for r in report.extra.get("quality") or [] if isinstance(r, Mapping) and isinstance(r.get("ppl"), (int, float))]
    if not rows:
        return None
    fig = _figure(7.0, 1.0 + 0.45 * len(rows))
    ax = fig.add_subplot()
    labels = [str(r.get("model_file") or r.get("config")) for r in rows]
    errors = [float(r["ppl_error"]) if isinstance(r.get("ppl_error"), (int, float)) else 0.0 for r in rows]
    ax.barh(range(len(rows)), [float(r["ppl"]) for r in rows], xerr=errors, capsize=3,
            color=[_VERDICT_COLOURS.get(str(r.get("verdict")), PALETTE[0]) for r in rows])  # fmt: skip
    for i, row in enumerate(rows):
        increase = row.get("increase_pct")
        note = f"{row.get('verdict', '')}" + (f"  {increase:+.1f}%" if isinstance(increase, (int, float)) else "")
        ax.annotate(note, (float(row["ppl"]) + errors[i], i), textcoords="offset points", xytext=(6, -3), fontsize=8)
    ax.set_yticks(range(len(rows)), labels)
    ax.invert_yaxis()
    ax.set_xlabel("perplexity (lower is better)")
    ax.set_xlim(0, max(float(r["ppl"]) + e for r, e in zip(rows, errors)) * 1.35)
    ax.grid(axis="x", alpha=0.3)
    return Chart("quality", "Quant quality", "Perplexity of each model on the corpus (± llama-perplexity's "
                 "uncertainty); the label: verdict and the increase over the reference.", fig)  # fmt: skip


#: Every chart, in page order.
CHARTS: tuple[Callable[[RunReport], Chart | None], ...] = (tok_s_chart, memory_chart, ttft_chart, itl_chart, sweep_chart,
                                                           load_chart, quality_chart)  # fmt: skip


def charts(report: RunReport) -> list[Chart]:
    return [chart for make in CHARTS if (chart := make(report)) is not None]


def write_charts(report: RunReport, directory: Path) -> list[Chart]:
    """SVG and PNG of every chart into ``directory``; the charts written."""
    made = charts(report)
    for chart in made:
        chart.write(directory)
    return made


__all__ = ["CHARTS", "Chart", "Sweep", "charts", "sweeps", "write_charts"]
