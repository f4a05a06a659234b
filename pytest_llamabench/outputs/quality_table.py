"""The quant quality table, shaped like the user's notes: one row per quality result.

| Quant | Size | PPL | vs reference | KLD | same top p | Verdict |

Verdict: ``Reference`` for the reference model; ``RECOMMENDED`` when the result met every
quality threshold set for it (``max_ppl_increase_pct``, ``max_kld_mean``, ``min_same_top_p``);
``NOT RECOMMENDED`` with the misses when it did not. The speed winner is chosen only among
configs whose model file is not NOT RECOMMENDED (``excluded``); a model without a quality
result is not judged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from pytest_llamabench.metrics import KLD_MEAN, PPL, PPL_ERROR, PPL_INCREASE_PCT, SAME_TOP_P_PCT, THRESHOLDS, Metric
from pytest_llamabench.outputs.kinds import QUALITY_ENDPOINT, is_quality
from pytest_llamabench.outputs.table import grid
from pytest_llamabench.results import ResultEntry

REFERENCE, RECOMMENDED, NOT_RECOMMENDED = "Reference", "RECOMMENDED", "NOT RECOMMENDED"
QUALITY_KEYS = tuple(k for k, m in THRESHOLDS.items() if m in (PPL_INCREASE_PCT, KLD_MEAN, SAME_TOP_P_PCT))
RULE = (
    f"Verdict: {RECOMMENDED} when every quality threshold set for it holds ({', '.join(QUALITY_KEYS)}), "
    f"{NOT_RECOMMENDED} when one fails. The speed WINNER is chosen only among configs whose model is not "
    f"{NOT_RECOMMENDED}"
)


@dataclasses.dataclass(frozen=True)
class QualityRow:
    config: str
    workload: str
    model_file: str | None
    size: int | None
    ppl: float | None
    ppl_error: float | None
    increase_pct: float | None
    kld_mean: float | None
    same_top_p_pct: float | None
    role: str  # reference | candidate | plain
    verdict: str
    why: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def build_rows(results: Iterable[ResultEntry]) -> list[QualityRow]:
    return [_row(e) for e in results if is_quality(e) and e.config and e.workload and e.outcome]


def _row(entry: ResultEntry) -> QualityRow:
    facts = entry.extra.get("quality") if isinstance(entry.extra.get("quality"), Mapping) else {}
    assert isinstance(facts, Mapping)
    role = str(facts.get("role") or "plain")
    model = entry.model or {}
    verdict, why = _verdict(entry, role)
    size = facts.get("model_bytes", model.get("size"))
    return QualityRow(
        config=str(entry.config), workload=str(entry.workload), model_file=model.get("file"),
        size=size if isinstance(size, int) else None, ppl=entry.median(PPL.name), ppl_error=entry.median(PPL_ERROR.name),
        increase_pct=entry.median(PPL_INCREASE_PCT.name), kld_mean=entry.median(KLD_MEAN.name),
        same_top_p_pct=entry.median(SAME_TOP_P_PCT.name), role=role, verdict=verdict, why=why,
    )  # fmt: skip


def _verdict(entry: ResultEntry, role: str) -> tuple[str, str]:
    measured_miss = entry.outcome == "xfailed" and entry.failure is not None and entry.failure.kind == "threshold"
    if entry.outcome not in ("passed", "failed") and not measured_miss:  # xfailed on its thresholds: expect = "not-recommended"
        return str(entry.outcome), entry.failure.message.splitlines()[0] if entry.failure else (entry.reason or "")
    if entry.failure is not None and entry.failure.kind != "threshold":
        return f"{entry.outcome}: {entry.failure.kind}", entry.failure.message.splitlines()[0]
    if role == "reference":
        return REFERENCE, ""
    limits = {k: v for k, v in (entry.thresholds or {}).items() if k in QUALITY_KEYS and isinstance(v, (int, float))}
    if not limits:
        return "—", "no quality threshold set"
    misses = [_miss(THRESHOLDS[k], entry.median(THRESHOLDS[k].name), float(v)) for k, v in limits.items()]
    failed = [m for m in misses if m]
    return (NOT_RECOMMENDED, "; ".join(failed)) if failed else (RECOMMENDED, "")


def _miss(metric: Metric, value: float | None, limit: float) -> str:
    if value is None:
        return f"{metric.label} not measured"
    if metric.passes(value, limit):
        return ""
    sign = "<" if metric.higher_is_better else ">"
    return f"{metric.label} {_num(value)}{metric.unit} {sign} {_num(limit)}{metric.unit}"


def excluded(results: Iterable[ResultEntry]) -> dict[str, str]:
    """Configs that may not win on speed: their model file was judged NOT RECOMMENDED, by config."""
    results = list(results)
    failed = {r.model_file: r for r in build_rows(results) if r.verdict == NOT_RECOMMENDED and r.model_file}
    out: dict[str, str] = {}
    for entry in results:
        file = (entry.model or {}).get("file")
        if entry.config and not is_quality(entry) and file in failed:
            row = failed[file]
            out[entry.config] = f"quality: {NOT_RECOMMENDED} ({row.config}: {row.why})"
    return out


def _size(size: int | None) -> str:
    if size is None:
        return "—"
    return f"{size / 1e9:.1f} GB" if size >= 1e9 else f"{size / 1e6:.0f} MB"


def _num(value: float) -> str:
    return f"{value:.4g}"


def cells(row: QualityRow) -> list[str]:
    ppl = "—" if row.ppl is None else f"{row.ppl:.4f}" + (f" ± {row.ppl_error:.4f}" if row.ppl_error else "")
    if row.role == "reference":
        vs = "baseline"
    else:
        vs = "—" if row.increase_pct is None else f"{row.increase_pct:+.1f}%"
    kld = "—" if row.kld_mean is None or row.role == "reference" else f"{row.kld_mean:.4f}"
    top = "—" if row.same_top_p_pct is None or row.role == "reference" else f"{row.same_top_p_pct:.1f}%"
    verdict = f"{row.verdict} ({row.why})" if row.why and row.verdict == NOT_RECOMMENDED else row.verdict
    return [row.config, _size(row.size), ppl, vs, kld, top, verdict]


HEADERS = ["Quant", "Size", "PPL", "vs reference", "KLD", "same top p", "Verdict"]


def render(rows: list[QualityRow], *, markdown: bool = False) -> str:
    body = [cells(r) for r in rows]
    if markdown:
        bold = [[f"**{c}**" if i == 0 and r.role == "reference" else c for i, c in enumerate(cs)] for r, cs in zip(rows, body)]
        return "\n".join(grid(HEADERS, bold, markdown=True)) + f"\n\n{_footer(rows)}. {RULE}.\n"
    return "\n".join(grid(HEADERS, body)) + f"\n{_footer(rows)}; {RULE}"


def _footer(rows: list[QualityRow]) -> str:
    refs = sorted({r.config for r in rows if r.role == "reference"})
    ref = f" ({', '.join(refs)})" if refs else ""
    return ("llama-perplexity: PPL ± its uncertainty; vs reference = PPL(Q)/PPL(ref) − 1; KLD = mean KL divergence "
            f"from the reference{ref}; same top p = how often the most likely token is the reference's")


def as_dict(rows: list[QualityRow]) -> dict[str, Any]:
    return {"rows": [r.as_dict() for r in rows], "rule": RULE}


__all__ = ["NOT_RECOMMENDED", "RECOMMENDED", "REFERENCE", "QualityRow", "as_dict", "build_rows", "excluded",
           "is_quality", "render"]  # fmt: skip
