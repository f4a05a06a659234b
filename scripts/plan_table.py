"""Markdown tables for docs/: the memory plan beside the measurement and the user's own numbers,
and the auto-fit searches, from the reports of scripts/gpu-session.sh.

    python scripts/plan_table.py docs/qwen35-run/matrix.json [docs/qwen35-run/c4-nofit.json] \
        [--search docs/qwen35-run/search.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: The user's table (../shared/seed/qwen35-migration-session.md, RTX 5080 16 GB): VRAM (MB) and status.
USER = {
    "C1": (8064, "Done"), "C2": (None, "OOM (21.6 GB needed)"), "C2a": (14647, "Done"), "C2b": (11387, "Done"),
    "C3": (8681, "Done"), "C4": (None, "Failed (flag not supported)"), "C4r": (14660, "Done"), "C5": (7217, "Done"),
    "C6": (None, "OOM (compute buffer)"), "C7": (14874, "WINNER"), "C8": (14551, "Done"),
}  # fmt: skip


def _entries(paths: list[Path]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for path in paths:
        for entry in json.loads(path.read_text())["results"]:
            if entry.get("config") and entry.get("workload"):
                out.setdefault(entry["config"], entry)
    return out


def _cell(value: object, fmt: str = "{:.0f}") -> str:
    return fmt.format(value) if isinstance(value, (int, float)) else "—"


def matrix_table(paths: list[Path]) -> str:
    lines = ["| Config | user VRAM (MB) | user status | measured VRAM (MiB) | plan VRAM (MiB) | plan − measured | "
             "failed buffer (MiB) | plan of that buffer | RSS (MiB) | plan RSS | gen tok/s | % of roofline | outcome |",
             "|" + "---|" * 13]  # fmt: skip
    for name, entry in _entries(paths).items():
        memory = entry.get("memory") or {}
        plan = memory.get("plan") or {}
        vram = (entry.get("metrics", {}).get("vram_peak_mib") or {}).get("max")
        rss = (entry.get("metrics", {}).get("rss_peak_mib") or {}).get("max")
        gen = (entry.get("metrics", {}).get("gen_tok_s") or {}).get("median")
        detail = ((entry.get("failure") or {}).get("detail")) or {}
        buffer = detail.get("buffer")
        key = {"model": "weights", "kv cache": "kv", "compute": "compute"}.get(str(buffer))
        planned_buffer = (plan.get("gpu_mib") or {}).get(key) if key else None
        diff = f"{100 * (plan['gpu_total_mib'] - vram) / vram:+.1f} %" if vram and plan.get("gpu_total_mib") else "—"
        user_vram, user_status = USER.get(name, (None, ""))
        outcome = entry["outcome"] + (f" [{entry['failure']['kind']}]" if entry.get("failure") else "")
        lines.append(f"| {name} | {_cell(user_vram)} | {user_status} | {_cell(vram)} | {_cell(plan.get('gpu_total_mib') or None)} | "
                     f"{diff} | {_cell(detail.get('requested_mib'))} {buffer or ''} | {_cell(planned_buffer)} | "
                     f"{_cell(rss)} | {_cell(plan.get('host_total_mib'))} | {_cell(gen, '{:.1f}')} | "
                     f"{_cell((memory.get('roofline') or {}).get('percent_of_ceiling'), '{:.0f} %')} | {outcome} |")  # fmt: skip
    return "\n".join(lines)


def search_tables(path: Path) -> str:
    out = []
    for entry in json.loads(path.read_text())["results"]:
        search = entry.get("search")
        if not search:
            continue
        out += [f"**{search['line']}**", "", "| value | outcome | gen tok/s | VRAM (MiB) | plan VRAM (MiB) | wall (s) | detail |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        for probe in search["probes"]:
            detail = (probe.get("failure") or {}).get("message", "")[:90]
            out.append(f"| {probe['value']} | {probe['outcome']} | {_cell(probe.get('gen_tok_s'), '{:.1f}')} | "
                       f"{_cell(probe.get('vram_mib'))} | {_cell(probe.get('predicted_gpu_mib'))} | {probe['wall_s']} | {detail} |")  # fmt: skip
        out.append("")
    return "\n".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("reports", nargs="*", type=Path, help="matrix reports (the first config entry of each wins)")
    parser.add_argument("--search", type=Path, help="the search report")
    args = parser.parse_args()
    if args.reports:
        print(matrix_table(args.reports))
        print()
    if args.search:
        print(search_tables(args.search))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
