"""What the waits benchmark reads from the real servers and workers besides the store's
footprint (core/footprint.py): worker slots in use (Celery's inspect), recovery tick times,
and VACUUM.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from celery import Celery

from ..core.library import recovery_tick
from ..core.stats import spread

__all__ = ["vacuum", "slots_in_use", "tick_series"]


def vacuum(postgres_url: str, schema: str) -> float:
    """VACUUM ANALYZE every table of `schema` (outside a transaction, as VACUUM must be);
    the seconds it took. The ticks after it show what dead row versions cost them."""
    engine = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    start = time.perf_counter()
    try:
        with engine.connect() as conn:
            tables = [r[0] for r in conn.execute(sa.text(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = :s AND c.relkind = 'r'"), {"s": schema})]
            for table in tables:
                conn.execute(sa.text(f'VACUUM ANALYZE "{schema}"."{table}"'))
    finally:
        engine.dispose()
    return time.perf_counter() - start


def slots_in_use(app: Celery, timeout_s: float = 3.0) -> dict[str, Any]:
    """Tasks the workers run now and hold reserved (Celery's remote control, the same as
    `celery inspect active/reserved`), by worker."""
    inspect = app.control.inspect(timeout=timeout_s)
    active = inspect.active() or {}
    reserved = inspect.reserved() or {}
    return {"workers_answering": len(active),
            "active": sum(len(v) for v in active.values()),
            "reserved": sum(len(v) for v in reserved.values()),
            "active_tasks": sorted({t.get("name", "?") for v in active.values() for t in v})}


def tick_series(app: Celery, repeats: int, pause_s: float = 0.3) -> dict[str, Any]:
    """`repeats` recovery ticks run here (orphans, then due waits), one after the other
    with a short pause: each half's time, median and spread, and what the ticks found."""
    runs = []
    for _ in range(repeats):
        runs.append(recovery_tick(app))
        time.sleep(pause_s)
    return {part: spread([r[part] for r in runs])
            for part in ("total_ms", "orphans_ms", "waits_ms")} | {
        "found": {k: sum(r[k] for r in runs) for k in ("scanned", "claimed", "woken",
                                                       "repaired")}}
