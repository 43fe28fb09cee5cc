"""Workload "waits": N executions (10,000; --quick 300) waiting at once for an event on a
real fleet, per store, at the library's default settings:

    worker slots held while they wait       inspect active/reserved, and fresh executions
                                            started on the same slots (target: 0 held)
    store bytes and keys/rows per waiting   Redis MEMORY USAGE of the store's keys,
    execution                               PostgreSQL pg_total_relation_size, deltas
    recovery tick time                      empty store, N waiting, N completed: medians
                                            and spread (target: unchanged within noise)
    event-to-resume latency p50/p99         from lai.send returning to the woken step body
                                            starting (target: p99 < 1 s past one recovery
                                            interval)

The waits are real: each execution is started with lai.start and its step calls
lai.wait_for("go", timeout=1 h), so its deadline sits in the lease index as a real wait's
does. One store's run is one_store.py; what is read from the servers, measure.py.

    python -m loadtest.waits [--quick] [--stores redis,postgres,tiered] [--executions N]
                             [--workers 2] [--concurrency 2] [--timeout-s 3600] [--out DIR]
"""

from __future__ import annotations

import time
from typing import Any

import livingai_tasks as lai

from ..core.context import RunContext
from ..core.machine import describe, library_state, load_average
from ..core.stores import unreachable
from ..core.tables import table
from .config import config_of
from .one_store import run_store

__all__ = ["NAME", "DESCRIPTION", "run", "summary_row", "checks"]

NAME = "waits"
DESCRIPTION = ("10,000 executions waiting at once on a real fleet: worker slots held, store "
               "bytes per wait, recovery tick time with them, event-to-resume latency")

COLUMNS = ["store", "waiting", "start/s", "slots held", "fresh p50 ms", "bytes/wait",
           "keys|rows/wait", "tick ms empty", "tick ms waiting", "tick ms done",
           "after VACUUM: waiting, done",
           "resume p50 ms", "resume p99 ms", "timeout late p50/p99 ms", "drain s"]


def _tick(report: dict[str, Any], which: str = "tick") -> str:
    if which not in report:
        return "-"
    t = report[which]["total_ms"]
    return f"{t['median']:.1f} ({t['min']:.1f}-{t['max']:.1f})"


def summary_row(r: dict[str, Any]) -> dict[str, Any]:
    """One line of the table from one store's report."""
    waiting = r["waiting"]
    per = r["per_execution"]
    size = sum(v["bytes"] for v in per.values())
    units = " + ".join(f"{v.get('keys', v.get('rows', 0)):.1f} {s}"
                       f"{' keys' if 'keys' in v else ' rows' if 'rows' in v else ''}"
                       for s, v in per.items())
    slots = waiting["slots"]
    return {"store": r["store"], "waiting": r["create"]["waiting"],
            "start/s": round(r["create"]["per_s"], 1),
            "slots held": f"{slots['active']} active, {slots['reserved']} reserved",
            "fresh p50 ms": round(waiting["fresh_ms"]["median"], 1),
            "bytes/wait": round(size), "keys|rows/wait": units,
            "tick ms empty": _tick(r["empty"]), "tick ms waiting": _tick(waiting),
            "tick ms done": _tick(r["completed"]),
            "after VACUUM: waiting, done": "-" if "tick_after_vacuum" not in waiting else
            f"{_tick(waiting, 'tick_after_vacuum')}, "
            f"{_tick(r['completed'], 'tick_after_vacuum')}",
            "resume p50 ms": round(r["latency"]["to_body_start_ms"]["p50"], 1),
            "resume p99 ms": round(r["latency"]["to_body_start_ms"]["p99"], 1),
            "timeout late p50/p99 ms": "{:.0f}/{:.0f}".format(
                r["timers"]["late_ms"]["p50"], r["timers"]["late_ms"]["p99"]),
            "drain s": round(r["drain"]["drain_s"], 1)}


def checks(r: dict[str, Any], interval_s: float) -> dict[str, bool]:
    """The issue's targets and the run's own sanity checks, for one store."""
    waiting, empty = r["waiting"], r["empty"]
    tick_with = waiting["tick"]["total_ms"]
    tick_without = empty["tick"]["total_ms"]
    return {
        "slots held == 0": waiting["slots"]["active"] == 0 and waiting["slots"]["reserved"] == 0,
        "every worker answered inspect": waiting["slots"]["workers_answering"] > 0,
        "none resumed before its event": waiting["resumed_before_any_send"] == 0,
        # "within noise": the median with them inside the spread seen without them, or
        # at most 1 ms above its median (a tick of a few ms on a shared machine)
        "tick unchanged within noise": tick_with["median"] <= max(
            tick_without["max"], tick_without["median"] + 1.0),
        f"resume p99 < {interval_s + 1:.0f} s": (
            r["latency"]["to_body_start_ms"]["p99"] < (interval_s + 1) * 1000),
        f"timeout woken < {interval_s + 1:.0f} s late (p99)": (
            r["timers"]["late_ms"]["p99"] < (interval_s + 1) * 1000),
        "all resumed": r["drain"]["resumed"] == r["create"]["waiting"],
        "none resumed twice": r["drain"]["resumed_twice"] == 0,
        "none left waiting": r["completed"]["waiting_left"] == 0,
    }


def run(ctx: RunContext) -> dict[str, Any]:
    cfg = config_of(ctx)
    settings = lai.Settings()
    status = ctx.servers.check()
    reports: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    started = time.time()
    ctx.log(f"waits: {cfg.executions} executions waiting at once, stores "
            f"{','.join(cfg.stores)}, {cfg.workers} step workers -c {cfg.concurrency}, "
            f"recovery_interval_s={settings.recovery_interval_s}")
    for kind in cfg.stores:
        why = unreachable(kind, status)
        if why:
            ctx.log(f"waits {kind}: skipped ({why})")
            skipped[kind] = why
            continue
        try:
            reports[kind] = run_store(ctx, cfg, kind)
        except Exception as exc:  # noqa: BLE001 - one store's failure must not end the others
            reports[kind] = {"store": kind, "error": ctx.failed(f"waits {kind}", exc)}
    rows = [summary_row(r) for r in reports.values() if "error" not in r]
    verdicts = {k: checks(r, settings.recovery_interval_s)
                for k, r in reports.items() if "error" not in r}
    result: dict[str, Any] = {
        "description": DESCRIPTION, "params": cfg.to_dict(),
        "settings": {"recovery_interval_s": settings.recovery_interval_s,
                     "recovery_page": settings.recovery_page, "lease_s": settings.lease_s},
        "machine": describe(), "library": library_state(),
        "started": time.strftime("%FT%TZ", time.gmtime(started)),
        "wall_s": time.time() - started, "load_end": load_average(),
        "stores": reports, "skipped": skipped, "summary": rows,
        "checks": verdicts,
    }
    text = table(rows, COLUMNS) if rows else "(no store ran)"
    failed = {k: r["error"] for k, r in reports.items() if "error" in r}
    for kind, reason in failed.items():
        text += f"\n{kind}: failed: {reason}"
    for kind, got in verdicts.items():
        missed = [name for name, ok in got.items() if not ok]
        text += f"\n{kind}: " + ("all checks met" if not missed else "MISSED " + "; ".join(missed))
    result["table"] = text
    ctx.write_json(NAME, result)
    return result
