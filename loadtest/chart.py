"""latency.png: hold percentiles per store and tier, ours against livingai (log scale)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .figures import BUDGET_MS

__all__ = ["write_chart"]

_PERCENTILES = (("held_p50_ms", "p50"), ("held_p95_ms", "p95"), ("held_p99_ms", "p99"))
_COLOURS = {"ours": ("#9ecae1", "#4292c6", "#08519c"),
            "livingai": ("#fdd0a2", "#fd8d3c", "#d94801")}


def write_chart(results: dict[str, Any], path: Path, *, title: str) -> Path | None:
    """Draw every workload that has rows; None if there is nothing to draw, or matplotlib
    (the `bench` extra) is not installed."""
    panels = []
    for name, result in results.items():
        rows = result.get("rows") if isinstance(result, dict) else None
        if isinstance(rows, dict):
            # Only rows with hold percentiles (other workloads measure other things).
            rows = {label: row for label, row in rows.items()
                    if isinstance(row, dict) and (row.get("ours") or {}).get("held_p50_ms")}
            if rows:
                panels.append((name, rows))
    if not panels:
        return None
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display: CI and servers
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, axes = plt.subplots(len(panels), 1, figsize=(13, 3.6 * len(panels)), squeeze=False)
    for ax, (name, rows) in zip(axes[:, 0], panels, strict=True):
        labels = list(rows)
        width = 0.13
        for g, label in enumerate(labels):
            for i, impl in enumerate(("ours", "livingai")):
                figures = rows[label].get(impl) or {}
                for j, (key, pct) in enumerate(_PERCENTILES):
                    value = figures.get(key)
                    if value is None:
                        continue
                    x = g + (i * 3 + j - 2.5) * width
                    ax.bar(x, max(value, 0.01), width, color=_COLOURS[impl][j],
                           label=f"{impl} {pct}" if g == 0 or label == labels[0] else None)
        ax.axhline(BUDGET_MS, color="#cb181d", linestyle="--", linewidth=1,
                   label=f"budget {BUDGET_MS:g} ms")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel("hold per save (ms)")
        ax.set_title(name, fontsize=10, loc="left")
        ax.grid(axis="y", which="both", alpha=0.25)
        handles, names = ax.get_legend_handles_labels()
        unique = dict(zip(names, handles, strict=True))
        ax.legend(unique.values(), unique.keys(), fontsize=7, ncol=7, loc="upper left")
        for g, label in enumerate(labels):
            if not rows[label].get("livingai"):
                ax.text(g + 0.2, ax.get_ylim()[0] * 1.15, "no livingai", fontsize=6,
                        ha="center", color="#7f7f7f", rotation=90, va="bottom")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
