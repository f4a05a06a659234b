"""The results table, shaped like the user's notes: one row per config.

| Config | Short | Medium | Long | Multi-turn | RSS (MiB) | VRAM (MiB) | Status |

Cells are median generation tok/s. The winner is chosen by a stated rule:
the highest mean of the per-workload median generation tok/s among configs
whose every test passed (ties: lower peak VRAM, then lower peak RSS).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

WINNER_RULE = (
    "WINNER = highest mean generation tok/s over all workloads, among configs whose every "
    "workload passed (ties: lower VRAM, then lower RSS)"
)


@dataclasses.dataclass
class Row:
    config: str
    description: str = ""
    gen_tok_s: dict[str, float] = dataclasses.field(default_factory=dict)
    rss_mib: float | None = None
    vram_mib: float | None = None
    outcomes: dict[str, str] = dataclasses.field(default_factory=dict)
    problem: str | None = None
    winner: bool = False

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
        if self.all_passed:
            return "Done"
        if self.problem:
            return self.problem
        counts: dict[str, int] = {}
        for outcome in self.outcomes.values():
            counts[outcome] = counts.get(outcome, 0) + 1
        return ", ".join(f"{n} {o}" for o, n in sorted(counts.items()))


def build_rows(results: Iterable[Mapping[str, Any]], descriptions: Mapping[str, str] | None = None) -> tuple[list[Row], list[str]]:
    """Rows in first-seen config order, plus the workload columns in first-seen order."""
    rows: dict[str, Row] = {}
    workloads: list[str] = []
    for result in results:
        config, workload = result.get("config"), result.get("workload")
        if not config or not workload:
            continue
        if workload not in workloads:
            workloads.append(workload)
        row = rows.setdefault(config, Row(config, (descriptions or {}).get(config, "")))
        row.outcomes[workload] = result["outcome"]
        metrics = result.get("metrics") or {}
        if result["outcome"] in ("passed", "failed") and "gen_tok_s" in metrics and metrics["gen_tok_s"].get("n"):
            row.gen_tok_s[workload] = metrics["gen_tok_s"]["median"]
        for key, attr in (("rss_peak_mib", "rss_mib"), ("vram_peak_mib", "vram_mib")):
            value = (metrics.get(key) or {}).get("max")
            if value is not None:
                setattr(row, attr, max(getattr(row, attr) or 0.0, value))
        if result["outcome"] != "passed" and row.problem is None:
            row.problem = _problem(result)
    ranked = [r for r in rows.values() if r.all_passed and r.gen_tok_s]
    if ranked:
        best = max(ranked, key=lambda r: (r.mean_gen, -(r.vram_mib or 0), -(r.rss_mib or 0)))
        best.winner = True
    return list(rows.values()), workloads


def _problem(result: Mapping[str, Any]) -> str:
    failure = result.get("failure") or {}
    kind, outcome = failure.get("kind"), result["outcome"]
    if kind == "oom":
        detail = failure.get("detail") or {}
        size = f" {detail['requested_mib']:.0f} MiB" if detail.get("requested_mib") else ""
        where = detail.get("device", "")
        expected = "expected " if outcome == "xfailed" else ""
        return f"{expected}OOM ({where}{size}{', ' + detail['buffer'] if detail.get('buffer') else ''})"
    if outcome == "xpassed" or "XPASS" in (result.get("reason") or ""):
        return "XPASS(strict): expected OOM, but it fits"
    if kind:
        return f"{outcome}: {kind}"
    reason = (result.get("reason") or "").strip()
    return f"{outcome}: {reason[:60]}" if reason else outcome


def render(rows: list[Row], workloads: list[str], *, markdown: bool = False) -> str:
    headers = ["Config", *[w.replace("-", " ").title().replace(" ", "-") for w in workloads],
               "RSS (MiB)", "VRAM (MiB)", "Status"]  # fmt: skip
    body = []
    for row in rows:
        cells = [f"**{row.config}**" if (markdown and row.winner) else row.config]
        cells += [f"{row.gen_tok_s[w]:.1f}" if w in row.gen_tok_s else "—" for w in workloads]
        cells += [f"{row.rss_mib:.0f}" if row.rss_mib else "—", f"{row.vram_mib:.0f}" if row.vram_mib else "—"]
        cells.append(f"**{row.status}**" if (markdown and row.winner) else row.status)
        body.append(cells)
    if markdown:
        lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines) + f"\n\nGeneration tok/s (median). {WINNER_RULE}.\n"
    widths = [max(len(str(c)) for c in col) for col in zip(headers, *body)]
    fmt = "  ".join(f"{{:<{w}}}" if i in (0, len(headers) - 1) else f"{{:>{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    lines += [fmt.format(*cells) for cells in body]
    return "\n".join(lines) + f"\ngeneration tok/s (median); {WINNER_RULE}"
