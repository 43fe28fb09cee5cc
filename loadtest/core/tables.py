"""Plain-text tables and number formats, shared by every workload's summary."""

from __future__ import annotations

from typing import Any

__all__ = ["number", "aligned", "table"]


def number(value: float) -> str:
    """Three significant digits at most, whole numbers from 100 on."""
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def aligned(rows: list[list[str]], *, left: int, rule: bool = False) -> list[str]:
    """`rows` (the first is the header) as lines of columns: the first `left` columns
    left-justified, the others right-justified; `rule` adds a line of dashes under the
    header. A row shorter than the header is a note: its leading cells are aligned, its last
    cell runs on unpadded."""
    columns = len(rows[0])
    widths = [max(len(r[i]) for r in rows if i < len(r) and (i < left or len(r) == columns))
              for i in range(columns)]

    def line(cells: list[str]) -> str:
        if len(cells) < columns:
            return "  ".join([*(c.ljust(w) for c, w in zip(cells[:-1], widths, strict=False)),
                              cells[-1]])
        return "  ".join(c.ljust(w) if i < left else c.rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    lines = [line(rows[0])]
    if rule:
        lines.append("  ".join("-" * w for w in widths))
    return lines + [line(r) for r in rows[1:]]


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return "-" if value is None else str(value)


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Dicts as a left-justified table of `columns`, a missing value shown as "-"."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    return "\n".join(aligned([list(columns), *cells], left=len(columns), rule=True))
