"""PostgreSQL: the step path's statements sent through psycopg directly.

A step's records cost a read (its entry check) and a write batch. Through SQLAlchemy's
execute() the read spent more CPU in SQLAlchemy than in the driver, and the write batch
(BEGIN, the fenced inserts, the latest-row upserts, an UPDATE per execution change,
COMMIT) cost five round trips, since execute() waits for each reply before it sends the
next statement; a fleet of quick steps pays both once a step. Here the read is one
psycopg call, and the batch goes in psycopg's pipeline mode, every reply read at the end:
one round trip. Each fenced insert returns its row when the fence let it in, so the
verdict on each version is the insert's own, taken under its lock on the execution row.

The statements are still SQLAlchemy's, compiled once, and each bind parameter goes
through its type's processor as SQLAlchemy would do (UTCDateTime makes naive datetimes
UTC). Driver errors come back as SQLAlchemy's DBAPIError, a dropped connection
invalidated in its pool, so the store translates them as it does every other error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any, cast

import psycopg
from psycopg.rows import dict_row
from sqlalchemy import exc
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

__all__ = ["Direct"]

_Processors = dict[str, Callable[[Any], Any]]


class Direct:
    """The step path's statements as psycopg SQL, and their sending on a pooled connection
    (a SQLAlchemy Connection, checked out and in the usual way)."""

    def __init__(self) -> None:
        self._compiled: dict[ClauseElement, tuple[str, _Processors]] = {}

    def _sql(self, stmt: ClauseElement, dialect: Dialect) -> tuple[str, _Processors]:
        # The statements are built once and kept (the store's, sql_rows' per-shape UPDATEs),
        # and one store's engines all have the same dialect: each is compiled once.
        found = self._compiled.get(stmt)
        if found is None:
            compiled = cast(SQLCompiler, stmt.compile(dialect=dialect))
            processors: _Processors = {}
            for name, bind in compiled.binds.items():
                process = bind.type.dialect_impl(dialect).bind_processor(dialect)
                if process is not None:
                    processors[name] = process
            found = self._compiled[stmt] = (compiled.string, processors)
        return found

    def _bound(self, processors: _Processors, params: dict[str, Any]) -> dict[str, Any]:
        if not processors:
            return params
        return {k: processors[k](v) if k in processors else v for k, v in params.items()}

    def first(self, conn: Connection, stmt: ClauseElement,
              params: dict[str, Any]) -> dict[str, Any] | None:
        """The first row of `stmt` (a read, on a connection in autocommit), by column name."""
        raw: Any = conn.connection.dbapi_connection
        sql, processors = self._sql(stmt, conn.dialect)
        try:
            with raw.cursor(row_factory=dict_row) as cursor:
                cursor.execute(sql, self._bound(processors, params))
                row: dict[str, Any] | None = cursor.fetchone()
                return row
        except psycopg.Error as err:
            raise _translated(conn, raw, err) from err

    def write(self, conn: Connection, insert: ClauseElement, rows: list[dict[str, Any]],
              upsert: ClauseElement, latest: list[dict[str, Any]],
              updates: Sequence[tuple[ClauseElement, dict[str, Any]]]
              ) -> tuple[list[bool], list[int]]:
        """BEGIN, `insert` of each row (with RETURNING: a row back means stored), `upsert` of
        each of `latest`, each update, COMMIT: in one round trip on `conn` (in autocommit,
        so psycopg adds no BEGIN of its own). Whether each row was stored, and each
        update's row count. On a driver error the transaction is rolled back."""
        raw: Any = conn.connection.dbapi_connection
        dialect = conn.dialect
        cursors: list[Any] = []
        try:
            with raw.pipeline():
                raw.execute("BEGIN")
                # A cursor per row: executemany(returning=True) would wait for its replies.
                inserts = [self._cursor(raw, dialect, insert, row) for row in rows]
                cursors += inserts
                cursors += [self._cursor(raw, dialect, upsert, row) for row in latest]
                counted = [self._cursor(raw, dialect, stmt, params) for stmt, params in updates]
                cursors += counted
                raw.execute("COMMIT")
            # The pipeline's end read every reply: a row back means stored.
            return [c.fetchone() is not None for c in inserts], [c.rowcount for c in counted]
        except psycopg.Error as err:
            raise _translated(conn, raw, err) from err
        finally:
            for cursor in cursors:
                cursor.close()

    def _cursor(self, raw: Any, dialect: Dialect, stmt: ClauseElement,
                params: dict[str, Any]) -> Any:
        sql, processors = self._sql(stmt, dialect)
        cursor = raw.cursor()
        cursor.execute(sql, self._bound(processors, params))
        return cursor


def _translated(conn: Connection, raw: Any, err: psycopg.Error) -> exc.StatementError:
    """`err` as SQLAlchemy would have raised it; a dropped connection is invalidated, and a
    failed transaction rolled back, so neither goes back to the pool as it is."""
    dialect = conn.dialect
    dropped: bool = dialect.is_disconnect(cast(Any, err), raw, None)
    if dropped:
        conn.invalidate(err)
    else:
        with suppress(psycopg.Error):  # the error returned says what failed
            raw.rollback()
    return exc.DBAPIError.instance(None, None, err, psycopg.Error,
                                   connection_invalidated=dropped, dialect=dialect)
