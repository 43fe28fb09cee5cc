"""Stores for one benchmark run: an isolated, migrated, empty store of each kind, and its
removal afterwards (Redis keys under the run's prefix, a PostgreSQL schema, a SQLite file)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import quote

import sqlalchemy as sa

import livingai_tasks as lai

from .celery_fleet import PG_URL, REDIS_URL, Namespace

__all__ = ["STORE_KINDS", "isolated_store"]

STORE_KINDS = ("redis", "postgres", "sqlite", "tiered")


def _pg_schema(schema: str, *, drop: bool) -> None:
    engine = sa.create_engine(PG_URL)
    try:
        with engine.begin() as conn:
            sql = f'DROP SCHEMA IF EXISTS "{schema}" CASCADE' if drop else \
                f'CREATE SCHEMA IF NOT EXISTS "{schema}"'
            conn.execute(sa.text(sql))
    finally:
        engine.dispose()


@contextmanager
def isolated_store(kind: str, ns: Namespace, workdir: Path) -> Iterator[str]:
    """Yield the URL of a fresh store of `kind`; remove it on the way out."""
    if kind not in STORE_KINDS:
        raise ValueError(f"store kind must be one of {STORE_KINDS}, got {kind!r}.")
    schema = f"{ns.pg_schema}_{kind}"
    sqlite_path = (workdir / f"{ns.prefix}-store.db").resolve()
    redis_url = f"{REDIS_URL}?prefix={ns.store_prefix}-{kind}"
    if kind in ("postgres", "tiered"):
        _pg_schema(schema, drop=False)
    pg = f"{PG_URL}?schema={schema}"
    url = {"redis": redis_url, "postgres": pg, "sqlite": f"sqlite:///{sqlite_path}",
           "tiered": f"tiered+{redis_url}&durable={quote(pg, safe='')}"}[kind]
    try:
        store = lai.open_store(url)
        store.migrate()  # never done on import: the schema must exist before workers start
        store.close()
        yield url
    finally:
        if kind in ("postgres", "tiered"):
            _pg_schema(schema, drop=True)
        for path in sqlite_path.parent.glob(sqlite_path.name + "*"):  # -wal, -shm too
            path.unlink(missing_ok=True)
