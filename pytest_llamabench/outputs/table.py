"""The results table, shaped like the user's notes: one row per config.

| Config | Short | Medium | Long | Multi-turn | RSS (MiB) | VRAM (MiB) | Status |

Cells are median generation tok/s (with several server starts: the median of the per-start
medians). The winner is chosen by a stated rule (``outputs.winner``): the highest mean of the
per-workload medians among configs whose every test passed on a quiet host, named only when it
beats the runner-up beyond noise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

from pytest_llamabench.metrics import GEN_TOK_S, RSS_PEAK_MIB, VRAM_PEAK_MIB
from pytest_llamabench.outputs.winner import Candidate, WinnerVerdict, decide
from pytest_llamabench.results import ResultEntry

WINNER_RULE = (
    "WINNER = highest mean generation tok/s over all workloads, among configs whose every "
    "workload passed on a quiet host, if it beats the runner-up beyond noise"
)


@dataclasses.dataclass
class Row:
    config: str
    description: str = ""
    gen_tok_s: dict[str, float] = dataclasses.field(default_factory=dict)
    rss_mib: float | None = None
    vram_mib: float | None = None
    #: peak VRAM per GPU (by UUID) of a config whose server saw several GPUs (``gpus = 2``)
    vram_by_device: dict[str, float] = dataclasses.field(default_factory=dict)
    outcomes: dict[str, str] = dataclasses.field(default_factory=dict)
    problem: str | None = None
    winner: bool = False
    tie: bool = False
    busy: bool = False
    starts: int = 1
    gen_samples: dict[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    #: why it may not win although it passed (its model was judged NOT RECOMMENDED: outputs.quality_table)
    excluded: str | None = None
    #: the memory plan's prediction (model/plan.py): "13607 / 9145" VRAM / RSS in MiB, "(no fit)" if predicted so
    planned: str | None = None

    @property
    def all_passed(self) -> bool:
        return bool(self.outcomes) and all(o == "passed" for o in self.outcomes.values())

    @property
    def mean_gen(self) -> float:
        return sum(self.gen_tok_s.values()) / len(self.gen_tok_s) if self.gen_tok_s else 0.0

    @property
    def status(self) -> str:
        if self.winner:
            return "WINNER"
        if self.busy:
            return "busy host: not ranked"
        if self.excluded:
            return self.excluded
        if self.tie:
            return "tie (within noise)"
        if self.all_passed:
            return "Done"
        if self.problem:
            return self.problem
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        return ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))


def build_rows(results: Iterable[ResultEntry], descriptions: Mapping[str, str] | None = None) -> tuple[list[Row], list[str]]:
    """Rows in first-seen config order, plus the workload columns in first-seen order."""
    rows, workloads, _ = build_table(results, descriptions)
    return rows, workloads


def build_table(
    results: Iterable[ResultEntry], descriptions: Mapping[str, str] | None = None, *, partial: str | None = None,
    exclude: Mapping[str, str] | None = None,
) -> tuple[list[Row], list[str], WinnerVerdict]:
    """Rows, workload columns and the winner verdict, from one entry per config x workload.

    ``partial`` (why the results are incomplete) names no winner; ``exclude`` (config -> why, e.g.
    its model failed the quality thresholds) keeps those configs out of the ranking."""
    rows: dict[str, Row] = {}
    workloads: list[str] = []
    for result in results:
        config, workload = result.config, result.workload
        if not config or not workload or result.outcome is None:
            continue
        if workload not in workloads:
            workloads.append(workload)
        row = rows.setdefault(config, Row(config, (descriptions or {}).get(config, "")))
        row.outcomes[workload] = result.outcome
        gen = result.median(GEN_TOK_S.name)
        if result.outcome in ("passed", "failed") and gen is not None:
            row.gen_tok_s[workload] = gen
            row.gen_samples[workload] = result.samples(GEN_TOK_S.name)
        row.starts = max(row.starts, int(result.extra.get("starts", 1)))
        row.busy = row.busy or bool((result.host_load or {}).get("busy"))
        for metric, attr in ((RSS_PEAK_MIB, "rss_mib"), (VRAM_PEAK_MIB, "vram_mib")):
            value = result.peak(metric.name)
            if value is not None:
                setattr(row, attr, max(getattr(row, attr) or 0.0, value))
        for device, mib in ((result.server or {}).get("vram") or {}).get("peak_by_device", {}).items():
            row.vram_by_device[device] = max(row.vram_by_device.get(device, 0.0), float(mib))
        if result.outcome != "passed" and row.problem is None:
            row.problem = _problem(result)
        row.planned = row.planned or _planned(result)
    for row in rows.values():
        row.excluded = (exclude or {}).get(row.config)
    ranked = [r for r in rows.values() if r.all_passed and r.gen_tok_s and not r.busy and not r.excluded]
    # equal speed: the config with less VRAM, then less RSS, goes first
    ranked.sort(key=lambda r: (-(r.vram_mib or 0), -(r.rss_mib or 0)), reverse=True)
    verdict = decide([Candidate(r.config, r.gen_samples, r.starts) for r in ranked], partial=partial)
    for row in rows.values():
        row.winner = row.config == verdict.winner
        row.tie = verdict.winner is None and row.config in (verdict.best, verdict.runner_up)
    return list(rows.values()), workloads, verdict


def speed_table(units: list[ResultEntry], descriptions: Mapping[str, str] | None = None, *,
                partial: str | None = None) -> tuple[list[Row], list[str], WinnerVerdict]:
    """The results table of a run, as the run prints it: speed results only (quality and load
    have tables of their own), configs whose model is NOT RECOMMENDED kept out of the ranking."""
    from pytest_llamabench.outputs.kinds import speed_results
    from pytest_llamabench.outputs.quality_table import excluded

    return build_table(speed_results(units), descriptions, partial=partial, exclude=excluded(units))


def _problem(result: ResultEntry) -> str:
    failure, outcome = result.failure, result.outcome
    if failure is not None and failure.kind == "oom":
        detail = failure.detail
        size = f" {detail['requested_mib']:.0f} MiB" if detail.get("requested_mib") else ""
        where = detail.get("device", "")
        expected = "expected " if outcome == "xfailed" else ""
        return f"{expected}OOM ({where}{size}{', ' + detail['buffer'] if detail.get('buffer') else ''})"
    if outcome == "xpassed" or "XPASS" in (result.reason or ""):
        return "XPASS(strict): expected OOM, but it fits"
    if failure is not None:
        return f"{outcome}: {failure.kind}"
    reason = (result.reason or "").strip()
    return f"{outcome}: {reason[:60]}" if reason else str(outcome)


def _planned(result: ResultEntry) -> str | None:
    plan = (result.extra.get("memory") or {}).get("plan") if isinstance(result.extra.get("memory"), dict) else None
    if not isinstance(plan, dict):
        return None
    gpu = f"{plan['gpu_total_mib']}" if plan.get("gpu_total_mib") else "—"
    return f"{gpu} / {plan.get('host_total_mib', '—')}" + (" (no fit)" if plan.get("fits") is False else "")


def _vram_cell(row: Row) -> str:
    """The summed peak; with several GPUs also each GPU's own peak: ``13412 (6710 + 6702)``."""
    if not row.vram_mib:
        return "—"
    per_gpu = [v for v in row.vram_by_device.values() if v]
    return f"{row.vram_mib:.0f} ({' + '.join(f'{v:.0f}' for v in per_gpu)})" if len(per_gpu) > 1 else f"{row.vram_mib:.0f}"


def render(rows: list[Row], workloads: list[str], *, markdown: bool = False, verdict: WinnerVerdict | None = None) -> str:
    headers = ["Config", *[w.replace("-", " ").title().replace(" ", "-") for w in workloads],
               "RSS (MiB)", "VRAM (MiB)", "Status"]  # fmt: skip
    planned = any(row.planned for row in rows)  # the memory plan beside the measurement (model/plan.py)
    if planned:
        headers.insert(-1, "Plan VRAM / RSS (MiB)")
    body = []
    for row in rows:
        cells = [f"**{row.config}**" if (markdown and row.winner) else row.config]
        cells += [f"{row.gen_tok_s[w]:.1f}" if w in row.gen_tok_s else "—" for w in workloads]
        cells += [f"{row.rss_mib:.0f}" if row.rss_mib else "—", _vram_cell(row)]
        cells += [row.planned or "—"] if planned else []
        cells.append(f"**{row.status}**" if (markdown and row.winner) else row.status)
        body.append(cells)
    if markdown:
        tail = f"\n\n**{verdict.line()}**" if verdict else ""
        return "\n".join(grid(headers, body, markdown=True)) + f"{tail}\n\nGeneration tok/s (median). {WINNER_RULE}.\n"
    tail = f"\n{verdict.line()}" if verdict else ""
    return "\n".join(grid(headers, body)) + f"{tail}\ngeneration tok/s (median); {WINNER_RULE}"


def grid(headers: Sequence[str], body: Sequence[Sequence[str]], *, markdown: bool = False) -> list[str]:
    """A table's lines: markdown, or aligned text (first and last columns left, the rest right),
    for the results, quality and load tables alike."""
    if markdown:
        return ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|",
                *("| " + " | ".join(cells) + " |" for cells in body)]  # fmt: skip
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *body)]
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, len(headers) - 1) else f"{{:>{w}}}" for i, w in enumerate(widths))
    return [fmt.format(*headers), fmt.format(*("-" * w for w in widths)), *(fmt.format(*cells) for cells in body)]
