"""Every livingai_tasks internal the load tests use, in one place.

The workloads use the public API (`import livingai_tasks as lai`, the names in
`livingai_tasks.__all__`); what they need beyond it is imported here and nowhere else, so
that when the library moves a module this is the one file to change. Written against the
Celery wing's modules (`livingai_tasks.celery_wing`).
"""

from __future__ import annotations

import time
from typing import Any

from livingai_tasks.celery_wing import runtime as _runtime
from livingai_tasks.celery_wing.context import idempotency_key_of
from livingai_tasks.celery_wing.install import CELERY_SETTINGS
from livingai_tasks.celery_wing.recover import recover_once
from livingai_tasks.celery_wing.tasks import RECOVER_TASK
from livingai_tasks.celery_wing.wake import wake_due
from livingai_tasks.journal import is_call, token_totals

__all__ = ["RECOVER_TASK", "INSTALL_CELERY_SETTINGS", "close_runtime", "idempotency_key_of",
           "engine_metrics", "recovery_tick", "flush_runtime", "recorded_calls", "token_totals",
           "durable_agent"]

# The worker settings install() applies to an app: the "plain-tuned" fleet variant applies
# the same ones without our recording, so the comparison splits settings from recording.
INSTALL_CELERY_SETTINGS: dict[str, Any] = dict(CELERY_SETTINGS)


def close_runtime(timeout_s: float) -> None:
    """Drain and close the runtime install() configured in this process, if any (its
    writer thread holds the store the run is about to delete)."""
    if _runtime.is_configured():
        _runtime.get().close(timeout_s=timeout_s)


def engine_metrics() -> dict[str, Any]:
    """This process's checkpoint engine metrics (Metrics.as_dict()), {} if none: what a
    scrape of the worker would show (the fleet has no exporter of its own here)."""
    if not _runtime.is_configured():
        return {}
    return _runtime.get().engine.metrics.as_dict()


def recovery_tick(app: Any) -> dict[str, Any]:
    """One recovery tick in this process, as the worker's recovery task runs it (orphans,
    then due waits), on the runtime install() configured here: what it found, and the
    milliseconds each half took."""
    rt = _runtime.get()
    owner = f"recovery@{rt.owner}"
    t0 = time.perf_counter()
    report = recover_once(app, rt.engine.store, rt.settings, owner=owner)
    t1 = time.perf_counter()
    woken = wake_due(app, rt.engine.store, rt.settings, by=owner)
    t2 = time.perf_counter()
    return {"orphans_ms": (t1 - t0) * 1000, "waits_ms": (t2 - t1) * 1000,
            "total_ms": (t2 - t0) * 1000, "scanned": report.scanned,
            "claimed": len(report.claimed), "woken": len(woken.woken) + len(woken.timed_out),
            "repaired": len(woken.repaired)}


def flush_runtime(timeout_s: float) -> bool:
    """Wait until this process's queued writes (a journal's write-behind) reached the store;
    False if they had not within `timeout_s`."""
    return _runtime.get().flush(timeout_s)


def recorded_calls(nodes: list[Any]) -> list[Any]:
    """The journaled calls among an execution's nodes (Store.nodes()), not its steps."""
    return [n for n in nodes if is_call(n)]


def durable_agent(agent: Any) -> Any:
    """The Pydantic AI adapter's DurableAgent around `agent` (imports Pydantic AI)."""
    from livingai_tasks.adapters.pydantic_ai import DurableAgent

    return DurableAgent(agent)
