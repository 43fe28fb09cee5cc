"""Markdown tables of a results.json, for loadtest/README.md.

    python -m loadtest markdown loadtest/results/<run>/results.json
"""

from __future__ import annotations

from typing import Any

from ..core.tables import number
from .report import COLUMNS

__all__ = ["render_markdown"]

_SHORT = {"production": ["held_p50_ms", "held_p95_ms", "held_p99_ms", "held_avg_ms",
                         "within_budget", "durable_at_return", "ack_p99_ms", "save_cpu_p99_ms",
                         "encode_p99_ms", "store_write_p99_ms", "durable", "recovered",
                         "total_s"],
          "hyperscale": ["held_p50_ms", "held_p99_ms", "held_avg_ms", "within_budget",
                         "ack_p99_ms", "save_cpu_p99_ms", "encode_p99_ms",
                         "store_write_p99_ms", "durable", "recovered", "total_s", "encode_s",
                         "cpu_s"]}


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "–"
    if kind == "share":
        return "100 %" if value >= 1 else f"{value * 100:.1f} %"
    if kind == "x":
        return f"{value:.2f}"
    return number(value)


def _table(name: str, result: dict[str, Any]) -> str:
    columns = COLUMNS[name]
    wanted = _SHORT.get(name)
    if wanted:
        by_key = {c[0]: c for c in columns}
        columns = [by_key[k] for k in wanted if k in by_key]
    head = ["row", "engine"] + [heading for _, heading, _ in columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in result["rows"].items():
        for impl in ("ours", "livingai", "ratio", "floor"):
            figures = row.get(impl)
            if not figures:
                if impl == "livingai":
                    why = row.get("livingai_error") or row.get("livingai_note") or "not run"
                    lines.append(f"| | livingai | {why} |" + " |" * (len(columns) - 1))
                continue
            kind_of = (lambda k: "x") if impl == "ratio" else None
            cells = [_fmt(figures.get(f), kind_of(f) if kind_of else kind)
                     for f, _, kind in columns]
            shown = {"ours": "**ours**", "livingai": "livingai", "ratio": "ours/livingai",
                     "floor": "cpu-only save"}[impl]
            lines.append(f"| {label if impl == 'ours' else ''} | {shown} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines)


def render_markdown(report: dict[str, Any]) -> str:
    parts = []
    for name, result in report.get("workloads", {}).items():
        if name in COLUMNS and isinstance(result.get("rows"), dict):
            parts.append(f"#### {name}\n\n{_table(name, result)}")
    targets = report.get("targets") or []
    if targets:
        lines = ["| target | row | figure | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['row']} | {t['detail']} | "
                  f"{'yes' if t['met'] else '**NO**'} |" for t in targets]
        parts.append("#### targets\n\n" + "\n".join(lines))
    run = report.get("run", {})
    parts.append(f"Load average (1/5/15 min) at start {run.get('load_average_start')}, "
                 f"at end {run.get('load_average_end')}.")
    return "\n\n".join(parts)
