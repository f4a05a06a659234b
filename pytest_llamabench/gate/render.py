"""A Comparison as a text table (terminal) or a markdown table (PR comment, step summary)."""

from __future__ import annotations

from collections.abc import Sequence

from pytest_llamabench.gate.statistics import min_repetitions
from pytest_llamabench.gate.verdicts import OUTCOME, Comparison, Row

FORMATS = ("text", "markdown")
_HEADER = ("config", "workload", "metric", "base", "new", "ratio", "p", "verdict", "note")
_DIFFERENT_SETUP = "measured on a different setup (see the warning)"


def render(comparison: Comparison, fmt: str = "text") -> str:
    if fmt not in FORMATS:
        raise ValueError(f"render format must be 'text' or 'markdown', got {fmt!r}")
    return _markdown(comparison) if fmt == "markdown" else _text(comparison)


def _footer(comparison: Comparison) -> tuple[str, str]:
    return (
        f"alpha={comparison.alpha:g}: the two-sided Mann-Whitney U test needs ≥"
        f"{min_repetitions(comparison.alpha)} repetitions per side to reach it",
        comparison.summary(),
    )


def _markdown(comparison: Comparison) -> str:
    flagged = any(row.fingerprint_differs for row in comparison.rows)
    alpha_line, summary = _footer(comparison)
    lines = [f"### llamabench: {comparison.new_source} vs {comparison.base_source}", ""]
    lines += [f"> **Warning:** {note}" for note in comparison.notes]
    lines += [""] if comparison.notes else []
    lines += [_md_line(_HEADER), "|" + "---|" * len(_HEADER)]
    lines += [_md_line(_cells(row)) for row in comparison.rows]
    lines += ["", *([rf"\* {_DIFFERENT_SETUP}"] if flagged else [])]
    return "\n".join([*lines, alpha_line, "", f"**{summary}**", ""])


def _text(comparison: Comparison) -> str:
    table = [_HEADER, *(_cells(row) for row in comparison.rows)]
    flagged = any(row.fingerprint_differs for row in comparison.rows)
    widths = [max(len(cells[i]) for cells in table) for i in range(len(_HEADER))]
    lines = [f"WARNING: {note}" for note in comparison.notes]
    for i, cells in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    lines += [f"* {_DIFFERENT_SETUP}"] if flagged else []
    return "\n".join([*lines, *_footer(comparison)]) + "\n"


def _cells(row: Row) -> tuple[str, ...]:
    if row.metric == OUTCOME:
        base, new = row.base_outcome or "missing", row.new_outcome or "missing"
    else:
        base, new = _num(row.base_median), _num(row.new_median)
    ratio = "—" if row.ratio is None else f"{row.ratio:.3f}"
    if row.ci is not None:
        ratio += f" [{row.ci[0]:.3f}, {row.ci[1]:.3f}]"
    p_value = "—" if row.p_value is None else f"{row.p_value:.3g}"
    verdict = row.verdict + ("*" if row.fingerprint_differs else "")
    return row.config, row.workload, row.metric, base, new, ratio, p_value, verdict, row.reason


def _num(value: float | None) -> str:
    if value is None:
        return "—"
    if abs(value) >= 100:
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) >= 1 else f"{value:.3g}"


def _md_line(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", r"\|") for c in cells) + " |"


__all__ = ["FORMATS", "render"]
