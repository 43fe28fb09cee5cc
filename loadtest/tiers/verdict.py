"""The targets, checked against a run's figures: each one met or not, with the numbers."""

from __future__ import annotations

from typing import Any

from .figures import BUDGET_MS

__all__ = ["check_targets"]


def _rows(results: dict[str, Any], workload: str) -> dict[str, Any]:
    return dict((results.get(workload) or {}).get("rows") or {})


def _check(out: list[dict[str, Any]], target: str, row: str, value: Any, met: bool,
           detail: str) -> None:
    out.append({"target": target, "row": row, "value": value, "met": met, "detail": detail})


def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if unit == "%":
        return f"{value:.1%}"
    return f"{value:.2f}{unit}"


def check_targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One entry per (target, row). A row whose figures are missing counts as not met."""
    out: list[dict[str, Any]] = []
    for workload, p99_limits in (("production", {"redis": 5.0, "postgres": 5.0}),
                                 ("hyperscale", {"redis": 10.0})):
        for row, data in _rows(results, workload).items():
            ours = data.get("ours") or {}
            budget = ours.get("within_budget")
            _check(out, f"{workload}: 100% within budget", row, budget, budget == 1.0,
                   _fmt(budget, "%"))
            durable = ours.get("durable")
            _check(out, f"{workload}: 100% durable", row, durable, durable == 1.0,
                   _fmt(durable, "%"))
            limit = p99_limits.get(data.get("store", ""))
            if limit is not None:
                p99 = ours.get("held_p99_ms")
                _check(out, f"{workload}: p99 hold < {limit:g} ms", row, p99,
                       p99 is not None and p99 < limit, _fmt(p99, " ms"))
            theirs = data.get("livingai") or {}
            if workload == "hyperscale" and theirs:
                a, b = ours.get("total_s"), theirs.get("total_s")
                met = a is not None and b is not None and a <= b / 2
                ratio = a / b if a is not None and b else None
                _check(out, "hyperscale: total time <= 1/2 of livingai's", row, ratio, met,
                       f"{_fmt(a, ' s')} vs {_fmt(b, ' s')} (x{_fmt(ratio)})")
    for workload in ("single", "production", "hyperscale"):
        for row, data in _rows(results, workload).items():
            if data.get("store") != "sqlite":
                continue
            ours = data.get("ours") or {}
            worst = ours.get("held_max_ms")
            _check(out, f"sqlite: never held past {BUDGET_MS:g} ms", f"{workload} {row}", worst,
                   worst is not None and worst <= BUDGET_MS, f"max hold {_fmt(worst, ' ms')}")
            durable = ours.get("durable")
            _check(out, "sqlite: 100% durable", f"{workload} {row}", durable, durable == 1.0,
                   _fmt(durable, "%"))
    return out
