"""Servers and isolated store targets: one per (workload, store, engine), removed after.

Isolation rules (the same as tests/conftest.py): SQLite is a file under the results folder,
Redis keys live under a prefix of this run's own and are deleted by SCAN + UNLINK of that
prefix (never FLUSHALL: other people's keys share the server), PostgreSQL gets a schema of
its own, dropped after.

livingai 0.4.1's Redis store has a fixed key prefix (`lai:n:`, `lai:c:`, `lai:e:` + id), so
its isolation comes from the ids instead: every node and execution id of a run starts with
the target's namespace, and cleanup deletes exactly `lai:[nce]:<namespace>-*`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

__all__ = ["Servers", "Target", "provision", "STORE_KINDS", "LIVINGAI_KINDS"]

STORE_KINDS = ("sqlite", "redis", "postgres", "tiered")
# livingai 0.4.1 has no tiered (Redis over PostgreSQL) store: there is nothing to compare.
LIVINGAI_KINDS = ("sqlite", "redis", "postgres")
_NEEDS = {"sqlite": (), "redis": ("redis",), "postgres": ("postgres",),
          "tiered": ("redis", "postgres")}


@dataclass(frozen=True)
class Servers:
    redis_url: str = os.environ.get("LOADTEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    postgres_url: str = os.environ.get("LOADTEST_POSTGRES_URL",
                                       "postgresql+psycopg://postgres@127.0.0.1:5432/test")

    def check(self) -> dict[str, str | None]:
        """{"redis": None or why it is unreachable, "postgres": ...}."""
        return {"redis": _check_redis(self.redis_url),
                "postgres": _check_postgres(self.postgres_url)}

    @staticmethod
    def unreachable(kind: str, status: dict[str, str | None]) -> str | None:
        for server in _NEEDS[kind]:
            if status.get(server):
                return f"{server} unreachable: {status[server]}"
        return None

    def versions(self, status: dict[str, str | None]) -> dict[str, str | None]:
        out: dict[str, str | None] = {"redis": None, "postgres": None}
        if not status.get("redis"):
            with suppress(Exception):
                import redis

                client = redis.Redis.from_url(self.redis_url)
                info = client.info("server")
                persistence = client.info("persistence")
                out["redis"] = (f"{info['redis_version']} "
                                f"(aof_enabled={persistence.get('aof_enabled')})")
                client.close()
        if not status.get("postgres"):
            with suppress(Exception):
                import sqlalchemy as sa

                engine = sa.create_engine(self.postgres_url)
                with engine.connect() as conn:
                    version = conn.scalar(sa.text("show server_version"))
                    fsync = conn.scalar(sa.text("show fsync"))
                    commit = conn.scalar(sa.text("show synchronous_commit"))
                engine.dispose()
                out["postgres"] = f"{version} (fsync={fsync}, synchronous_commit={commit})"
        return out


def _check_redis(url: str) -> str | None:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        client.ping()
        client.close()
    except Exception as exc:  # noqa: BLE001 - any failure means "skip this store"
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_postgres(url: str) -> str | None:
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(url, connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


@dataclass
class Target:
    """One isolated store. `spec` is JSON for the readback subprocess, which reopens it."""

    kind: str
    impl: str  # "ours" or "livingai"
    ns: str  # id namespace; also the Redis prefix and the PostgreSQL schema name
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Our open_store() URL (ours only)."""
        return str(self.spec["url"])


@contextmanager
def provision(servers: Servers, results_dir: Path, kind: str, impl: str,
              ns: str) -> Iterator[Target]:
    """Create an empty store target, yield it, and remove everything it held."""
    store_dir = results_dir / "stores"
    store_dir.mkdir(parents=True, exist_ok=True)
    pg_dsn = servers.postgres_url
    redis_url = servers.redis_url
    spec: dict[str, Any] = {"impl": impl, "kind": kind}
    schema = ns if kind in ("postgres", "tiered") else None
    db_path = store_dir / f"{ns}.db" if kind == "sqlite" else None
    if schema:
        _pg_exec(pg_dsn, f'CREATE SCHEMA "{schema}"')
    try:
        if impl == "ours":
            pg_url = f"{pg_dsn}?schema={schema}"
            spec["url"] = {
                "sqlite": f"sqlite:///{db_path}",
                "redis": f"{redis_url}?prefix={ns}",
                "postgres": pg_url,
                "tiered": f"tiered+{redis_url}?prefix={ns}&durable={quote(pg_url, safe='')}",
            }[kind]
        else:
            spec.update(path=str(db_path), redis_url=redis_url, schema=schema,
                        dsn=pg_dsn.replace("postgresql+psycopg://", "postgresql://", 1))
        yield Target(kind, impl, ns, spec)
    finally:
        if kind in ("redis", "tiered"):
            pattern = f"{ns}:*" if impl == "ours" else f"lai:[nce]:{ns}-*"
            _redis_delete(redis_url, pattern)
        if schema:
            _pg_exec(pg_dsn, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        if db_path is not None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                with suppress(FileNotFoundError):
                    Path(f"{db_path}{suffix}").unlink()


def _pg_exec(url: str, sql: str) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(sql))
    finally:
        engine.dispose()


def _redis_delete(url: str, pattern: str) -> int:
    import redis

    client = redis.Redis.from_url(url)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += client.unlink(*batch)
                batch.clear()
        if batch:
            deleted += client.unlink(*batch)
    finally:
        client.close()
    return deleted

