"""Store kinds, and one isolated store of a kind: created empty, removed after its run.

Every workload, the checkpoint tiers as well as the Celery fleet and chaos runs, gets its
stores here. A store is named by one string of the run's own (`name`), and everything it
holds lives under that name: the Redis keys `<name>:*`, the PostgreSQL schema `<name>`
(hyphens as underscores) and the SQLite file `<name>.db` in the run's `stores/` folder.
Leaving `isolated()` deletes all three, whatever happened inside.

livingai 0.4.1's Redis store has a fixed key prefix (`lai:n:`, `lai:c:`, `lai:e:` + id): its
isolation comes from the ids instead (every id of a run starts with the name), so its
caller passes the pattern to delete, `lai:[nce]:<name>-*`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from .servers import Servers, delete_keys, execute_sql

__all__ = ["STORE_KINDS", "StoreSite", "isolated", "unreachable"]

STORE_KINDS = ("sqlite", "redis", "postgres", "tiered")
_NEEDS = {"sqlite": (), "redis": ("redis",), "postgres": ("postgres",),
          "tiered": ("redis", "postgres")}


def unreachable(kind: str, status: dict[str, str | None]) -> str | None:
    """Why a store of `kind` cannot run, given Servers.check()'s answer; None if it can."""
    for server in _NEEDS[kind]:
        if status.get(server):
            return f"{server} unreachable: {status[server]}"
    return None


@dataclass(frozen=True)
class StoreSite:
    """Where one isolated store lives."""

    kind: str
    name: str  # the Redis key prefix, and (as `schema`) the PostgreSQL schema
    servers: Servers
    sqlite_path: Path | None  # sqlite only
    schema: str | None  # postgres and tiered only

    @property
    def url(self) -> str:
        """livingai_tasks' open_store() URL of this store."""
        redis_url = f"{self.servers.redis_url}?prefix={self.name}"
        pg_url = f"{self.servers.postgres_url}?schema={self.schema}"
        return {"sqlite": f"sqlite:///{self.sqlite_path}", "redis": redis_url,
                "postgres": pg_url,
                "tiered": f"tiered+{redis_url}&durable={quote(pg_url, safe='')}"}[self.kind]


@contextmanager
def isolated(servers: Servers, kind: str, name: str, results_dir: Path, *,
             redis_pattern: str | None = None) -> Iterator[StoreSite]:
    """An empty store of `kind` named `name` (schema created, nothing migrated: whoever
    opens it migrates); on the way out its keys (`redis_pattern`, default `<name>:*`),
    schema and files are deleted."""
    if kind not in STORE_KINDS:
        raise ValueError(f"store kind must be one of {', '.join(STORE_KINDS)}, got {kind!r}.")
    store_dir = results_dir / "stores"
    sqlite_path = (store_dir / f"{name}.db").resolve() if kind == "sqlite" else None
    schema = name.replace("-", "_") if kind in ("postgres", "tiered") else None
    if sqlite_path is not None:
        store_dir.mkdir(parents=True, exist_ok=True)
    if schema:
        execute_sql(servers.postgres_url, f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    try:
        yield StoreSite(kind, name, servers, sqlite_path, schema)
    finally:
        if kind in ("redis", "tiered"):
            delete_keys(servers.redis_url, redis_pattern or f"{name}:*")
        if schema:
            execute_sql(servers.postgres_url, f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        if sqlite_path is not None:
            for suffix in ("", "-wal", "-shm", "-journal"):
                Path(f"{sqlite_path}{suffix}").unlink(missing_ok=True)
            with suppress(OSError):
                store_dir.rmdir()  # only once the last store file of the run is gone
