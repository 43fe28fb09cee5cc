"""PostgreSQL: a batch of writes, BEGIN to COMMIT, in one round trip.

SQLAlchemy's execute() waits for each statement's reply before it sends the next, so a
write batch (BEGIN, the fenced inserts, the latest-row upserts, an UPDATE per execution
change, COMMIT) cost five round trips, and a fleet of quick steps pays one batch per step.
psycopg's pipeline mode sends them all and reads every reply at the end. Each fenced
insert returns its row when the fence let it in, so the verdict on each version is the
insert's own, taken under its lock on the execution row: nothing is read back after.

The statements are SQLAlchemy's, compiled once, and each bind parameter goes through its
type's processor as SQLAlchemy would do (UTCDateTime makes naive datetimes UTC). Driver
errors come back as SQLAlchemy's DBAPIError, a dropped connection invalidated in its pool,
so the store translates them as it does every other error.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import suppress
from typing import Any, cast

import psycopg
from sqlalchemy import exc
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

__all__ = ["Pipelined"]

_Processors = dict[str, Callable[[Any], Any]]


class Pipelined:
    """The write path's statements as psycopg SQL for one dialect, and the pipelined send."""

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
            dropped: bool = dialect.is_disconnect(cast(Any, err), raw, None)
            if dropped:
                conn.invalidate(err)
            else:
                with suppress(psycopg.Error):  # the error raised below says what failed
                    raw.rollback()  # a failed transaction must not go back to the pool open
            raise exc.DBAPIError.instance(None, None, err, psycopg.Error,
                                          connection_invalidated=dropped,
                                          dialect=dialect) from err
        finally:
            for cursor in cursors:
                cursor.close()

    def _cursor(self, raw: Any, dialect: Dialect, stmt: ClauseElement,
                params: dict[str, Any]) -> Any:
        sql, processors = self._sql(stmt, dialect)
        cursor = raw.cursor()
        cursor.execute(sql, self._bound(processors, params))
        return cursor
