"""The charts of a run, drawn from the results it wrote (matplotlib, the `bench` extra).

    latency.png      hold percentiles per store and tier, ours against livingai (log scale)
    fleet-chaos.png  the fleet's throughput against plain Celery, per store and kind of step,
                     and the chaos run's fault-to-resume times (or, for an outage, the time
                     to drain after the server returned) and outcome, per fault kind

fleet-chaos.png reads fleet.json and chaos.json from the results folder: `python -m loadtest
all` writes both there, and so do `python -m loadtest.fleet` and `python -m loadtest.chaos`
(by default into loadtest/results/, where the chart then shows the latest run of each).
Each legend sits outside the plotting area, so no bar is ever hidden behind it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .tiers.figures import BUDGET_MS

__all__ = ["write_charts", "write_latency_chart", "write_fleet_chaos_chart", "latency_figure",
           "fleet_chaos_figure"]

_PERCENTILES = (("held_p50_ms", "p50"), ("held_p95_ms", "p95"), ("held_p99_ms", "p99"))
_COLOURS = {"ours": ("#9ecae1", "#4292c6", "#08519c"),
            "livingai": ("#fdd0a2", "#fd8d3c", "#d94801")}
_TARGET = "#cb181d"


def _pyplot() -> Any:
    """matplotlib's pyplot without a display, or None when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display: CI and servers
    import matplotlib.pyplot as plt

    return plt


def write_charts(out_dir: Path, results: dict[str, Any], subtitle: str) -> list[Path]:
    """Every chart `python -m loadtest all` has data for."""
    drawn = [write_latency_chart(results, out_dir / "latency.png",
                                 title=f"Hold per save, ours vs livingai 0.4.1 ({subtitle})"),
             write_fleet_chaos_chart(out_dir)]
    return [path for path in drawn if path is not None]


def write_latency_chart(results: dict[str, Any], path: Path, *, title: str) -> Path | None:
    """A panel per workload that has rows with hold percentiles; None if there is nothing
    to draw or no matplotlib."""
    return _save(latency_figure(results, title=title), path)


def _save(fig: Any, path: Path) -> Path | None:
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def latency_figure(results: dict[str, Any], *, title: str) -> Any:
    """The figure of latency.png (open: the caller saves or inspects it, then closes it),
    or None if there is nothing to draw or no matplotlib."""
    panels = []
    for name, result in results.items():
        rows = result.get("rows") if isinstance(result, dict) else None
        if isinstance(rows, dict):
            rows = {label: row for label, row in rows.items()
                    if isinstance(row, dict) and (row.get("ours") or {}).get("held_p50_ms")}
            if rows:
                panels.append((name, rows))
    plt = _pyplot() if panels else None
    if plt is None:
        return None
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    height = 3.4 * len(panels) + 0.9  # + the title and the legend above the panels
    fig, axes = plt.subplots(len(panels), 1, figsize=(13, height), squeeze=False)
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
                    ax.bar(g + (i * 3 + j - 2.5) * width, max(value, 0.01), width,
                           color=_COLOURS[impl][j], label=f"{impl} {pct}")
        ax.axhline(BUDGET_MS, color=_TARGET, linestyle="--", linewidth=1,
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
        for g, label in enumerate(labels):
            if not rows[label].get("livingai"):
                ax.text(g + 0.2, ax.get_ylim()[0] * 1.15, "no livingai", fontsize=6,
                        ha="center", color="#7f7f7f", rotation=90, va="bottom")
    # One legend for every panel (they share colours), above them all: outside every
    # plotting area, so it hides no bar.
    entries: dict[str, Any] = {}
    for ax in axes[:, 0]:
        handles, names = ax.get_legend_handles_labels()
        entries.update(zip(names, handles, strict=True))
    top = 1 - 0.9 / height
    fig.legend(entries.values(), entries.keys(), loc="lower center", ncol=len(entries),
               fontsize=8, frameon=False, bbox_to_anchor=(0.5, top))
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, top))
    return fig


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_fleet_chaos_chart(out_dir: Path) -> Path | None:
    """fleet-chaos.png from `out_dir`/fleet.json and chaos.json, a panel for each that has
    rows; None if neither has, or no matplotlib."""
    return _save(fleet_chaos_figure(out_dir), out_dir / "fleet-chaos.png")


def fleet_chaos_figure(out_dir: Path) -> Any:
    """The figure of fleet-chaos.png (open, as latency_figure's), or None."""
    fleet = [r for r in (_read(out_dir / "fleet.json") or {}).get("summary", [])
             if r.get("ratio") is not None]
    chaos_result = _read(out_dir / "chaos.json") or {}
    chaos = [r for r in chaos_result.get("summary", []) if _chaos_row_shown(r)]
    plt = _pyplot() if fleet or chaos else None
    if plt is None:
        return None
    panels = [p for p, rows in (("fleet", fleet), ("chaos", chaos)) if rows]
    widths = [max(4.5, 1.1 * len(fleet) + 2.5) if p == "fleet" else max(4.5, 1.9 * len(chaos)
                                                                           + 2.5)
              for p in panels]
    fig, axes = plt.subplots(1, len(panels), figsize=(sum(widths) + 1, 6.0), squeeze=False,
                             gridspec_kw={"width_ratios": widths})
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "fleet":
            _fleet_panel(ax, fleet)
        else:
            _chaos_panel(ax, chaos, chaos_result.get("celery_alone") or {})
    fig.suptitle("livingai_tasks on a real Celery fleet:\nthroughput, and resuming after "
                 "faults", fontsize=11)
    fig.tight_layout()
    return fig


def _fleet_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    labels = [f"{r['store']}\n{r['work']}" for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.19 for i in x], [r["ratio"] for r in rows], 0.36, color="#4292c6",
           label="livingai_tasks / plain Celery")
    ax.bar([i + 0.19 for i in x], [r.get("ratio_vs_tuned") or 0 for r in rows], 0.36,
           color="#9ecae1", label="livingai_tasks / Celery with the same settings")
    for i, r in enumerate(rows):
        rounds = r.get("ratio_rounds") or []
        # Inside the bar, at its foot: above it the rounds' dots and the target line run.
        ax.text(i - 0.19, 0.03, f"{r['ratio']:.3f}", ha="center", fontsize=7, color="white")
        ax.plot([i - 0.19] * len(rounds), rounds, "k.", markersize=4,
                label="one round" if i == 0 and rounds else None)
    target = 0.85
    ax.axhline(target, color=_TARGET, linestyle="--", linewidth=1,
               label=f"target with Redis: {target:g}")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_xlim(-0.7, len(rows) - 0.3)  # one row: bars of the usual width, not the panel's
    highest = max(max([r["ratio"], *(r.get("ratio_rounds") or [])]) for r in rows)
    ax.set_ylim(0, max(1.1, highest + 0.1))  # a noisy quick run can pass 1
    ax.set_ylabel("steps/s, as a share of Celery's")
    ax.set_title("fleet: throughput (median of the rounds)", fontsize=10, loc="left")
    ax.grid(axis="y", alpha=0.25)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2,
              frameon=False)


def _chaos_row_shown(row: dict[str, Any]) -> bool:
    return row.get("resume_p50_s") is not None or row.get("drain_s") is not None


def _chaos_panel(ax: Any, rows: list[dict[str, Any]], alone: dict[str, Any]) -> None:
    """One group of bars per run (fault kind, settings variant, store): kill -> resume p50
    and p99, or for an outage the time to drain after the server returned; each run's
    target as a short dashed line over its bars."""
    x = range(len(rows))
    for offset, key, colour, name in ((-0.15, "resume_p50_s", "#74c476", "fault -> the step "
                                       "runs again, p50"),
                                      (0.15, "resume_p99_s", "#238b45", "... p99"),
                                      (0.0, "drain_s", "#6baed6", "outage: server back -> "
                                       "all in flight finished")):
        values = [r.get(key) for r in rows]
        shown = [(i, v) for i, v in enumerate(values) if v is not None]
        if not shown:
            continue
        ax.bar([i + offset for i, _ in shown], [v for _, v in shown], 0.28, color=colour,
               label=name)
        for i, v in shown:
            ax.text(i + offset, v + 0.1, f"{v:.1f}", ha="center", fontsize=7)
    targets = [(i, r["target_s"]) for i, r in enumerate(rows) if r.get("target_s")]
    for n, (i, target) in enumerate(targets):
        ax.plot([i - 0.35, i + 0.35], [target, target], color=_TARGET, linestyle="--",
                linewidth=1, label="target (p99)" if n == 0 else None)
    labels = [f"{r.get('fault', 'sigkill')}\n{r.get('variant', '')} {r['store']}"
              f"{' / ' + r['broker'] + ' broker' if r.get('broker') else ''}\n"
              f"{r['completed']}/{r['executions']} done, {r['lost']} lost"
              f"{', ' + str(r['failed']) + ' failed' if r.get('failed') else ''}\n"
              f"twice: {r.get('dup_distinct_keys', r.get('duplicates', 0))} distinct keys,"
              f" {r.get('dup_same_key', 0)} same key" for r in rows]
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_xlim(-0.7, len(rows) - 0.3)
    highest = max([t for _, t in targets] + [r.get(k) or 0 for r in rows
                                             for k in ("resume_p99_s", "drain_s")])
    ax.set_ylim(0, max(highest, 1.0) * 1.25)
    ax.set_ylabel("seconds")
    title = "chaos: faults at the library's settings"
    if "error" not in alone and alone.get("executions"):
        title += (f"\n(Celery alone, SIGKILLs: {alone['not_finished']} of "
                  f"{alone['executions']} not finished {alone['deadline']})")
    ax.set_title(title, fontsize=10, loc="left")
    ax.grid(axis="y", alpha=0.25)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.30), ncol=2,
              frameon=False)
