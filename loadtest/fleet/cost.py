"""What a fleet batch cost, besides its wall time: the CPU of each part of the machine
(the variant's workers, Redis, PostgreSQL, the publisher) and the bytes the store grew by.

The CPU comes from /proc (core/process_cpu.py), so it is each process's own time, not the
machine's busy time: other jobs on the machine do not count, the servers' work for this
batch does (Redis serves the broker and results of every variant too; the difference
between variants is what the store costs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import redis

from ..core.process_cpu import PartsClock, pids_named
from ..core.servers import Servers
from .processes import Fleet, Namespace, children_of

__all__ = ["PARTS", "batch_clock", "store_bytes"]

PARTS = ("workers", "redis", "postgres", "publisher")


def _fleet_pids(fleet: Fleet) -> list[int]:
    pids = []
    for proc in fleet.procs:
        if proc.alive():
            pids += [proc.pid, *children_of(proc.pid)]
    return pids


def batch_clock(fleet: Fleet) -> PartsClock:
    """A clock of PARTS for a batch run by `fleet`, published from this process."""
    return PartsClock({"workers": lambda: _fleet_pids(fleet),
                       "redis": lambda: pids_named("redis-server"),
                       "postgres": lambda: pids_named("postgres"),
                       "publisher": lambda: [os.getpid()]})


def store_bytes(servers: Servers, ns: Namespace, kind: str, url: str) -> int:
    """The store's footprint now: Redis MEMORY USAGE of its keys, PostgreSQL's table sizes
    (indexes and TOAST included), the SQLite file and its WAL; the tiered store both."""
    total = 0
    if kind in ("redis", "tiered"):
        client = redis.Redis.from_url(ns.redis_url)
        try:
            pipe = client.pipeline(transaction=False)
            for key in client.scan_iter(match=f"{ns.store_name(kind)}:*", count=1000):
                pipe.memory_usage(key, samples=0)
            total += sum(int(n or 0) for n in pipe.execute())
        finally:
            client.close()
    if kind in ("postgres", "tiered"):
        total += _schema_bytes(servers.postgres_url, ns.store_name(kind).replace("-", "_"))
    if kind == "sqlite":
        path = url.removeprefix("sqlite:///")
        total += sum(Path(p).stat().st_size for p in (path, f"{path}-wal")
                     if Path(p).exists())
    return total


def _schema_bytes(postgres_url: str, schema: str) -> int:
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            found: Any = conn.execute(sa.text(
                "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = :schema AND c.relkind = 'r'"), {"schema": schema}).scalar()
    finally:
        engine.dispose()
    return int(found)
