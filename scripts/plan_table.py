"""Markdown tables for docs/: the memory plan beside the measurement and the user's own numbers,
and the auto-fit searches, from the reports of scripts/gpu-session.sh.

    python scripts/plan_table.py docs/qwen35-run/matrix.json [docs/qwen35-run/c4-nofit.json] \
        [--search docs/qwen35-run/search.json]
    python scripts/plan_table.py --card-mib 16384 docs/qwen35-run/checks/matrix-12GiB-q8.json \
        docs/qwen35-run/checks/matrix-12GiB-q4.json --workloads docs/qwen35-run/checks/workloads.json \
        docs/qwen35-run/checks/checks.json --search docs/qwen35-run/checks/search-q8.json \
        docs/qwen35-run/checks/search-q4.json > docs/qwen35-run/checks/tables.md

``--card-mib``: the user's card; a run under a smaller VRAM budget then models a card on which
other processes (a desktop's display server, browser) hold ``card - budget``: its table adds
that to the measured peak, which is what nvidia-smi shows on such a card, beside the user's column.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pytest_llamabench.model.plan import fit_first_partial, reported_fit

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


def _facts(entry: dict[str, Any]) -> dict[str, Any]:
    """What both matrix tables read from one result: measured VRAM, plan, plan − measured, the failed
    buffer beside the plan of that buffer, and the outcome."""
    plan = (entry.get("memory") or {}).get("plan") or {}
    vram = (entry.get("metrics", {}).get("vram_peak_mib") or {}).get("max")
    detail = ((entry.get("failure") or {}).get("detail")) or {}
    buffer = detail.get("buffer")
    key = {"model": "weights", "kv cache": "kv", "compute": "compute"}.get(str(buffer))
    return {
        "vram": vram, "plan": plan,
        "diff": f"{100 * (plan['gpu_total_mib'] - vram) / vram:+.1f} %" if vram and plan.get("gpu_total_mib") else "—",
        "failed": f"{_cell(detail.get('requested_mib'))} {buffer or ''}",
        "planned_buffer": (plan.get("gpu_mib") or {}).get(key) if key else None,
        "outcome": entry["outcome"] + (f" [{entry['failure']['kind']}]" if entry.get("failure") else ""),
    }  # fmt: skip


def held_table(paths: list[Path], card_mib: int, logs: Path | None = None) -> str:
    """The user's matrix under a budget below their card: measured + what other processes held, beside the user's column."""
    entries = _entries(paths)
    budgets = {json.loads(p.read_text())["fingerprint"].get("vram_budget_mib") for p in paths}
    if len(budgets) != 1 or not isinstance(budget := budgets.pop(), int):
        raise SystemExit(f"plan_table: --card-mib needs reports of one VRAM budget, got {sorted(map(str, budgets))}")
    held = card_mib - budget
    lines = [f"VRAM budget {budget} MiB = a {card_mib} MiB card with {held} MiB held by other processes:", "",
             f"| Config | user VRAM (MB) | user status | measured VRAM (MiB) | + {held} held | vs user | plan VRAM (MiB) | "
             "plan − measured | failed buffer (MiB) | plan of that buffer | --fit on: plan / server's own choice | outcome |",
             "|" + "---|" * 12]  # fmt: skip
    for name in USER:
        entry = entries.get(name)
        if entry is None:
            continue
        f = _facts(entry)
        user_vram, user_status = USER[name]
        total = f["vram"] + held if f["vram"] else None
        versus = f"{100 * (total - user_vram) / user_vram:+.1f} %" if total and user_vram else "—"
        lines.append(f"| {name} | {_cell(user_vram)} | {user_status} | {_cell(f['vram'])} | {_cell(total)} | {versus} | "
                     f"{_cell(f['plan'].get('gpu_total_mib') or None)} | {f['diff']} | {f['failed']} | "
                     f"{_cell(f['planned_buffer'])} | {_fit(entry, logs)} | {f['outcome']} |")  # fmt: skip
    return "\n".join(lines)


def _fit(entry: dict[str, Any], logs: Path | None) -> str:
    """``15 partial (up) / 15 partial (gate)``: the plan's fit layout beside the one fit logged (from the
    report, or from the server log in ``logs``: reports written before the report carried it)."""
    memory = entry.get("memory") or {}
    plan = memory.get("plan") or {}
    planned, logged = plan.get("fit_layout"), memory.get("reported_fit")
    if planned is None and plan.get("fit_overrides"):  # reports of the second H200 lease carried the overrides
        rules = plan["fit_overrides"]
        planned = {"n_partial": len(rules), "first_partial": fit_first_partial(rules, plan["n_layer"])}
    log = logs / Path(entry.get("server", {}).get("log", "")).name if logs else None
    if logged is None and log is not None and log.is_file():
        logged = reported_fit(log.read_text(errors="replace"))
    if not planned and not logged:
        return "—"
    def text(x: dict[str, Any] | None) -> str:
        if not x:
            return "—"
        return f"-ngl {x['n_gpu_layers']}" if x["n_partial"] is None else f"{x['n_partial']} partial ({x['first_partial']})"

    return " / ".join(text(x) for x in (planned, logged))


def workloads_table(paths: list[Path]) -> str:
    """The server's VRAM peak after each workload (one server per config runs them in order)."""
    rows: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    for path in paths:
        for entry in json.loads(path.read_text())["results"]:
            if not entry.get("workload"):
                continue
            row = rows.setdefault(entry["config"], {"plan": ((entry.get("memory") or {}).get("plan") or {}).get("gpu_total_mib"),
                                                    "outcome": set(), "args": entry.get("server", {}).get("args", [])})  # fmt: skip
            row[entry["workload"]] = (entry.get("metrics", {}).get("vram_peak_mib") or {}).get("max")
            row["outcome"].add(entry["outcome"])
            order += [w for w in [entry["workload"]] if w not in order]
    lines = ["| Config | " + " | ".join(f"after {w} (MiB)" for w in order) + " | plan (MiB) | outcomes |",
             "|" + "---|" * (len(order) + 3)]  # fmt: skip
    for name, row in rows.items():
        cells = " | ".join(_cell(row.get(w)) for w in order)
        lines.append(f"| {name} | {cells} | {_cell(row['plan'])} | {', '.join(sorted(row['outcome']))} |")
    return "\n".join(lines)


def matrix_table(paths: list[Path]) -> str:
    lines = ["| Config | user VRAM (MB) | user status | measured VRAM (MiB) | plan VRAM (MiB) | plan − measured | "
             "failed buffer (MiB) | plan of that buffer | RSS (MiB) | plan RSS | gen tok/s | % of roofline | outcome |",
             "|" + "---|" * 13]  # fmt: skip
    for name, entry in _entries(paths).items():
        f = _facts(entry)
        rss = (entry.get("metrics", {}).get("rss_peak_mib") or {}).get("max")
        gen = (entry.get("metrics", {}).get("gen_tok_s") or {}).get("median")
        roofline = ((entry.get("memory") or {}).get("roofline") or {}).get("percent_of_ceiling")
        user_vram, user_status = USER.get(name, (None, ""))
        lines.append(f"| {name} | {_cell(user_vram)} | {user_status} | {_cell(f['vram'])} | {_cell(f['plan'].get('gpu_total_mib') or None)} | "
                     f"{f['diff']} | {f['failed']} | {_cell(f['planned_buffer'])} | "
                     f"{_cell(rss)} | {_cell(f['plan'].get('host_total_mib'))} | {_cell(gen, '{:.1f}')} | "
                     f"{_cell(roofline, '{:.0f} %')} | {f['outcome']} |")  # fmt: skip
    return "\n".join(lines)


def search_tables(paths: list[Path]) -> str:
    out = []
    for entry in (e for path in paths for e in json.loads(path.read_text())["results"]):
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
    parser.add_argument("--search", type=Path, nargs="+", help="search reports")
    parser.add_argument("--card-mib", type=int, help="the user's card: the reports' budget models it with the rest held")
    parser.add_argument("--workloads", type=Path, nargs="+", help="reports whose VRAM peak after each workload to tabulate")
    parser.add_argument("--logs", type=Path, help="the reports' server logs (for what --fit on chose)")
    args = parser.parse_args()
    if args.reports:
        print(held_table(args.reports, args.card_mib, args.logs) if args.card_mib else matrix_table(args.reports))
        print()
    if args.workloads:
        print(workloads_table(args.workloads))
        print()
    if args.search:
        print(search_tables(args.search))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
