"""What the waits benchmark reads from the real servers and workers: store footprint (Redis
MEMORY USAGE of the store's keys, PostgreSQL table sizes and row counts, the SQLite file),
worker slots in use (Celery's inspect), and recovery tick times.

Footprints are absolute; the workload subtracts the empty store's from the one holding the
waiting executions, and divides by how many wait.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from celery import Celery

from ..core.library import recovery_tick
from ..core.stats import spread

__all__ = ["redis_footprint", "postgres_footprint", "vacuum", "sqlite_footprint", "footprint",
           "slots_in_use", "tick_series"]


def redis_footprint(redis_url: str, pattern: str) -> dict[str, Any]:
    """Keys matching `pattern`, their MEMORY USAGE summed (SAMPLES 0: every element of a
    hash, set or sorted set counted, not estimated), by kind of key."""
    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=pattern, count=2000))
    total = 0
    by_kind: dict[str, list[int]] = {}
    for i in range(0, len(keys), 1000):
        chunk = keys[i:i + 1000]
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            pipe.memory_usage(key, samples=0)
        for key, used in zip(chunk, pipe.execute(), strict=True):
            total += int(used or 0)
            # The kind of a key: its name without the prefix and the id (e.g. "e", "n",
            # "idx:status:WAITING"), so a reader sees what a waiting execution costs.
            parts = key.decode(errors="replace").split(":")
            kind = ":".join(p for p in parts[1:] if len(p) < 24) or "(root)"
            entry = by_kind.setdefault(kind, [0, 0])
            entry[0] += 1
            entry[1] += int(used or 0)
    return {"keys": len(keys), "bytes": total,
            "by_kind": {k: {"keys": v[0], "bytes": v[1]} for k, v in sorted(by_kind.items())}}


def postgres_footprint(postgres_url: str, schema: str) -> dict[str, Any]:
    """Each table of `schema`: live rows (count(*)) and pg_total_relation_size (heap,
    indexes, TOAST; dead row versions an update left until vacuum included)."""
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            tables = [r[0] for r in conn.execute(sa.text(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = :s AND c.relkind = 'r' ORDER BY 1"), {"s": schema})]
            out: dict[str, Any] = {}
            for table in tables:
                qualified = f'"{schema}"."{table}"'
                rows = conn.execute(sa.text(f"SELECT count(*) FROM {qualified}")).scalar_one()
                size = conn.execute(sa.text("SELECT pg_total_relation_size(:t)"),
                                    {"t": qualified}).scalar_one()
                out[table] = {"rows": int(rows), "bytes": int(size)}
    finally:
        engine.dispose()
    return {"rows": sum(t["rows"] for t in out.values()),
            "bytes": sum(t["bytes"] for t in out.values()), "tables": out}


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


def sqlite_footprint(url: str) -> dict[str, Any]:
    path = Path(url.removeprefix("sqlite:///"))
    sizes = {s or "db": Path(f"{path}{s}").stat().st_size
             for s in ("", "-wal") if Path(f"{path}{s}").exists()}
    return {"bytes": sum(sizes.values()), "files": sizes}


def footprint(kind: str, *, redis_url: str, postgres_url: str, name: str,
              store_url: str) -> dict[str, Any]:
    """The store's footprint on its server(s); tiered: its Redis hot tier and its
    PostgreSQL durable tier, each."""
    schema = name.replace("-", "_")
    if kind == "redis":
        return {"redis": redis_footprint(redis_url, f"{name}:*")}
    if kind == "postgres":
        return {"postgres": postgres_footprint(postgres_url, schema)}
    if kind == "tiered":
        return {"redis": redis_footprint(redis_url, f"{name}:*"),
                "postgres": postgres_footprint(postgres_url, schema)}
    return {"sqlite": sqlite_footprint(store_url)}


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
