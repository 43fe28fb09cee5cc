"""The SQL store's side records (KeepsSideRecords) on the `lai_side_records` table.

A mixin of SQLStore, kept apart so sql.py stays about nodes and executions. A group's
records are rows keyed (space, grp, key); each call is one transaction.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .sql_schema import SIDE_RECORDS

__all__ = ["SQLSideRecords"]

_T = SIDE_RECORDS


class SQLSideRecords:
    """KeepsSideRecords for SQLStore (which provides _transaction and _upsert)."""

    def _transaction(self, *, write: bool) -> AbstractContextManager[Connection]:
        raise NotImplementedError  # SQLStore's

    def _upsert(self, table: sa.Table) -> Any:
        raise NotImplementedError  # SQLStore's

    def side_get(self, space: str, group: str) -> dict[str, bytes]:
        query = sa.select(_T.c.key, _T.c.value).where(_T.c.space == space, _T.c.grp == group)
        with self._transaction(write=False) as conn:
            return {str(k): bytes(v) for k, v in conn.execute(query)}

    def side_put(self, space: str, group: str, records: Mapping[str, bytes], *,
                 replace: bool = True) -> None:
        if not records:
            return
        rows = [{"space": space, "grp": group, "key": k, "value": bytes(v)}
                for k, v in records.items()]
        stmt = self._upsert(_T).values(rows)
        keys = [_T.c.space, _T.c.grp, _T.c.key]
        stmt = (stmt.on_conflict_do_update(index_elements=keys,
                                           set_={"value": stmt.excluded.value})
                if replace else stmt.on_conflict_do_nothing(index_elements=keys))
        with self._transaction(write=True) as conn:
            conn.execute(stmt)

    def side_delete(self, space: str, group: str, keys: Sequence[str] | None = None) -> None:
        stmt = _T.delete().where(_T.c.space == space, _T.c.grp == group)
        if keys is not None:
            if not keys:
                return
            stmt = stmt.where(_T.c.key.in_(list(keys)))
        with self._transaction(write=True) as conn:
            conn.execute(stmt)

    def side_groups(self, space: str) -> list[str]:
        query = (sa.select(_T.c.grp).where(_T.c.space == space).distinct()
                 .order_by(_T.c.grp))
        with self._transaction(write=False) as conn:
            return [str(g) for (g,) in conn.execute(query)]
