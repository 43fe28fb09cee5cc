"""The SQL store's worker liveness records (TracksWorkers) on the `lai_workers` table.

A mixin of SQLStore: one job, kept apart so sql.py stays about nodes and executions. Each
method is one statement in one transaction, so a beat costs one round trip and one commit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, RowMapping

from ..nodes import dumps_json, utcnow
from ._common import check_page
from .base import WorkerRecord, check_counters
from .sql_schema import WORKERS

__all__ = ["SQLWorkers"]

log = logging.getLogger("livingai_tasks.stores")


def _record(row: RowMapping) -> WorkerRecord:
    counters = row["counters"]  # NULL: written before schema version 5
    return WorkerRecord(worker=row["worker"], expires_at=float(row["expires_at"]),
                        owners=tuple(json.loads(row["owners"])),
                        holding=tuple(json.loads(row["holding"])),
                        counters=check_counters(json.loads(counters) if counters else None,
                                                row["worker"]))


class SQLWorkers:
    """TracksWorkers for SQLStore (which provides _transaction and _upsert)."""

    _beat_statement: Any = None

    def _transaction(self, *, write: bool) -> AbstractContextManager[Connection]:
        raise NotImplementedError  # SQLStore's

    def _upsert(self, table: sa.Table) -> Any:
        raise NotImplementedError  # SQLStore's

    def beat_worker(self, worker: str, *, expires_at: float, owners: Sequence[str],
                    holding: Sequence[str], counters: Mapping[str, float] | None = None
                    ) -> None:
        """Insert or replace the worker's liveness row: one statement, one round trip."""
        values = {"worker": worker, "expires_at": float(expires_at),
                  "owners": dumps_json(list(owners), what=f"Worker {worker} owners"),
                  "holding": dumps_json(list(holding), what=f"Worker {worker} holding"),
                  "counters": dumps_json(check_counters(counters, worker),
                                         what=f"Worker {worker} counters"),
                  "updated_at": utcnow()}
        if self._beat_statement is None:  # built once: a worker beats for every new message
            insert = self._upsert(WORKERS)
            self._beat_statement = insert.on_conflict_do_update(
                index_elements=[WORKERS.c.worker],
                set_={c.name: insert.excluded[c.name] for c in WORKERS.c if c.name != "worker"})
        with self._transaction(write=True) as conn:
            conn.execute(self._beat_statement, values)

    def dead_workers(self, now: float, limit: int = 100) -> list[WorkerRecord]:
        """Workers whose expires_at < now, oldest deadline first."""
        check_page(limit, 0)
        query = (sa.select(WORKERS).where(WORKERS.c.expires_at < float(now))
                 .order_by(WORKERS.c.expires_at, WORKERS.c.worker).limit(limit))
        with self._transaction(write=False) as conn:
            return [_record(row) for row in conn.execute(query).mappings()]

    def workers(self, limit: int = 1000) -> list[WorkerRecord]:
        check_page(limit, 0)
        query = sa.select(WORKERS).order_by(WORKERS.c.worker).limit(limit)
        with self._transaction(write=False) as conn:
            rows = list(conn.execute(query).mappings())
        found = []
        for row in rows:
            try:
                found.append(_record(row))
            except (ValueError, TypeError) as exc:  # one bad row hides no other
                log.warning("livingai_tasks: skipping malformed worker row %r: %s",
                            row["worker"], exc)
        return found

    def worker(self, worker: str) -> WorkerRecord | None:
        query = sa.select(WORKERS).where(WORKERS.c.worker == worker)
        with self._transaction(write=False) as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else _record(row)

    def forget_worker(self, worker: str) -> None:
        with self._transaction(write=True) as conn:
            conn.execute(WORKERS.delete().where(WORKERS.c.worker == worker))


