"""The benchmark package's layout rules that a move could quietly break: only one module
imports livingai_tasks internals, and the fleet and chaos charts read what the runs write.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

import pytest

import livingai_tasks
from loadtest.charts import fleet_chaos_figure, latency_figure, write_fleet_chaos_chart

LOADTEST = Path(__file__).resolve().parent.parent / "loadtest"
INTERNALS_MODULE = LOADTEST / "core" / "library.py"


def _internal_imports(path: Path) -> list[str]:
    """`livingai_tasks.<module>` imports, and names imported from livingai_tasks that are
    not in its __all__, in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("livingai_tasks.")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith("livingai_tasks."):
                found.append(node.module)
            elif node.module == "livingai_tasks":
                found += [f"livingai_tasks.{a.name}" for a in node.names
                          if a.name not in livingai_tasks.__all__]
    return found


def test_only_core_library_imports_livingai_tasks_internals() -> None:
    offenders = {str(p.relative_to(LOADTEST)): _internal_imports(p)
                 for p in LOADTEST.rglob("*.py") if p != INTERNALS_MODULE}
    assert {p: names for p, names in offenders.items() if names} == {}
    # ...and the rule is not vacuous: the one module does import internals.
    assert _internal_imports(INTERNALS_MODULE)


def test_the_rule_sees_an_internal_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from livingai_tasks import runtime, start\nimport livingai_tasks.engine\n")
    assert _internal_imports(probe) == ["livingai_tasks.runtime", "livingai_tasks.engine"]


def _write_fleet_and_chaos(folder: Path) -> None:
    (folder / "fleet.json").write_text(json.dumps({"summary": [
        {"store": "redis", "work": "llm20", "ratio": 0.88, "ratio_vs_tuned": 0.93,
         "ratio_rounds": [0.87, 0.88, 0.9]}]}))
    row = {"variant": "defaults", "store": "redis", "broker": "redis", "executions": 100,
           "completed": 100,
           "lost": 0, "dup_distinct_keys": 0, "dup_same_key": 0}
    (folder / "chaos.json").write_text(json.dumps({"summary": [
        {**row, "fault": "sigkill-worker", "resume_p50_s": 10.2, "resume_p99_s": 14.1,
         "target_s": 15.0, "drain_s": None},
        {**row, "fault": "sigstop", "dup_same_key": 1, "resume_p50_s": 9.0,
         "resume_p99_s": 11.0, "target_s": None, "drain_s": None},
        {**row, "fault": "store-outage", "resume_p50_s": None, "resume_p99_s": None,
         "target_s": None, "drain_s": 7.5}],
        "celery_alone": {"executions": 30, "not_finished": 3, "deadline": "45s"}}))


def test_fleet_chaos_chart_is_drawn_from_the_files_the_runs_write(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    assert write_fleet_chaos_chart(tmp_path) is None  # nothing written yet: no chart
    _write_fleet_and_chaos(tmp_path)
    path = write_fleet_chaos_chart(tmp_path)
    assert path == tmp_path / "fleet-chaos.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _percentiles(p50: float) -> dict[str, float]:
    return {"held_p50_ms": p50, "held_p95_ms": p50 * 2, "held_p99_ms": p50 * 4}


def _legends_cover_nothing(fig: Any) -> None:
    """No legend overlaps a plotting area, a tick label or a title, nor leaves the image."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends
    texts = [t for ax in fig.axes for t in [*ax.get_xticklabels(), *ax.get_yticklabels(),
                                             ax.title, ax._left_title]
             if t.get_visible() and t.get_text()] + [fig._suptitle]
    image = fig.bbox
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title(loc="left")
        for text in texts:
            assert not box.overlaps(text.get_window_extent(renderer)), text.get_text()
        assert image.x0 <= box.x0 and box.x1 <= image.x1, "the legend leaves the image"
        assert image.y0 <= box.y0 and box.y1 <= image.y1, "the legend leaves the image"


def test_no_legend_hides_a_bar_or_a_label() -> None:
    """latency.png's legend once covered the production panel's bars near 20-200 ms."""
    plt = pytest.importorskip("matplotlib.pyplot")
    rows = {f"{store} {n}": {"ours": _percentiles(0.4 * (n + 1)),
                             "livingai": _percentiles(20.0 * (n + 1))}
            for store in ("sqlite", "redis", "postgres", "tiered") for n in range(2)}
    results = {name: {"rows": rows} for name in ("single", "production", "hyperscale")}
    fig = latency_figure(results, title="hold per save")
    try:
        _legends_cover_nothing(fig)
    finally:
        plt.close(fig)


def test_the_fleet_and_chaos_legends_hide_nothing(tmp_path: Path) -> None:
    plt = pytest.importorskip("matplotlib.pyplot")
    _write_fleet_and_chaos(tmp_path)
    fig = fleet_chaos_figure(tmp_path)
    try:
        _legends_cover_nothing(fig)
    finally:
        plt.close(fig)
