"""A store's footprint on its servers: Redis MEMORY USAGE of its keys, PostgreSQL's table
sizes and row counts, the SQLite file and its WAL. What the fleet's bytes per step and the
waits' bytes per waiting execution are read from (absolute: callers subtract)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa

__all__ = ["redis_footprint", "postgres_footprint", "sqlite_footprint", "footprint",
           "total_bytes"]


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


def total_bytes(found: dict[str, Any]) -> int:
    """The bytes of a footprint() answer, over its servers."""
    return sum(int(part["bytes"]) for part in found.values())
