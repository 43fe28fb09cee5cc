"""Plain-text tables of a run: one per workload (ours, livingai, ratio), and the targets."""

from __future__ import annotations

from typing import Any

from ..core.tables import aligned, number

__all__ = ["render_workload", "render_targets", "COLUMNS"]

# (figure, heading, kind): kind "ms", "s", "share", "n" or "x" picks the format.
_COMMON = [("held_p50_ms", "hold p50", "ms"), ("held_p95_ms", "hold p95", "ms"),
           ("held_p99_ms", "hold p99", "ms"), ("held_avg_ms", "hold avg", "ms"),
           ("within_budget", "<=50ms", "share"), ("durable_at_return", "dur@ret", "share"),
           ("ack_p50_ms", "to-dur p50", "ms"), ("ack_p99_ms", "to-dur p99", "ms")]
COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "single": _COMMON + [("hot_read_p50_ms", "hot rd", "ms"),
                         ("cold_first_ms", "cold 1st", "ms"),
                         ("cold_read_p50_ms", "cold rd", "ms"), ("durable", "durable", "share"),
                         ("total_s", "total s", "s")],
    "production": _COMMON + [("save_cpu_p99_ms", "save cpu p99", "ms"),
                             ("encode_p99_ms", "enc p99", "ms"),
                             ("store_write_p99_ms", "store p99", "ms"),
                             ("durable", "durable", "share"), ("recovered", "recov", "share"),
                             ("total_s", "total s", "s"), ("cpu_s", "cpu s", "s")],
    "hyperscale": _COMMON + [("save_cpu_p99_ms", "save cpu p99", "ms"),
                             ("encode_p99_ms", "enc p99", "ms"),
                             ("store_write_p99_ms", "store p99", "ms"),
                             ("durable", "durable", "share"), ("recovered", "recov", "share"),
                             ("total_s", "total s", "s"), ("encode_s", "enc s", "s"),
                             ("cpu_s", "cpu s", "s")],
}
_DEFAULT = _COMMON + [("durable", "durable", "share"), ("total_s", "total s", "s")]


def _cell(value: Any, kind: str) -> str:
    if value is None:
        return "-"
    if not isinstance(value, (int, float)):
        return str(value)
    if kind == "share":
        return f"{value:.1%}" if value < 1 else "100%"
    if kind == "x":
        return f"x{value:.2f}"
    if kind == "n":
        return f"{value:.0f}"
    return number(value)


def render_workload(name: str, result: dict[str, Any]) -> str:
    """The workload's own "table" text if it brings one, else ours/livingai/ratio rows."""
    if isinstance(result.get("table"), str):
        return f"== {name}: {result.get('description', '')}\n{result['table']}"
    rows = result.get("rows")
    if not isinstance(rows, dict):
        return f"== {name}: (no table; see the JSON file)"
    columns = COLUMNS.get(name, _DEFAULT)
    header = ["row", "engine"] + [heading for _, heading, _ in columns]
    table: list[list[str]] = []
    for label, row in rows.items():
        for impl in ("ours", "livingai", "ratio", "floor"):
            figures = row.get(impl)
            if impl == "floor":  # burst rows only: our save's CPU, nothing else
                if figures:
                    table.append(["", "cpu-only save"] + [_cell(figures.get(f), kind)
                                                       for f, _, kind in columns])
                continue
            if impl == "ratio":
                if figures:
                    table.append(["", "ours/liv"] + [_cell(figures.get(f), "x")
                                                     for f, _, _ in columns])
                continue
            if figures is None:
                why = row.get(f"{impl}_error") or row.get(f"{impl}_note") or "not run"
                why = why if len(why) < 110 else why[:107] + "..."
                table.append([label if impl == "ours" else "", impl, f"({why})"])
                continue
            table.append([label if impl == "ours" else "", impl] +
                         [_cell(figures.get(f), kind) for f, _, kind in columns])
    return "\n".join([f"== {name}: {result.get('description', '')}",
                      *aligned([header, *table], left=2)])


def render_targets(targets: list[dict[str, Any]]) -> str:
    if not targets:
        return "Targets: nothing to check (no production/hyperscale/sqlite rows ran)."
    met = sum(t["met"] for t in targets)
    lines = [f"Targets: {met}/{len(targets)} met"]
    width = max(len(t["target"]) for t in targets)
    row_width = max(len(t["row"]) for t in targets)
    for t in targets:
        mark = "met " if t["met"] else "MISS"
        lines.append(f"  {mark}  {t['target']:<{width}}  {t['row']:<{row_width}}  {t['detail']}")
    return "\n".join(lines)
