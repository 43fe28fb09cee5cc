"""The step path's statements sent through the driver directly (psycopg, sqlite3).

A step's records cost a read (its entry check) and a write batch (the fenced inserts, the
latest-row upserts, an UPDATE per execution change). Through SQLAlchemy's execute() both
spent more CPU in SQLAlchemy than in the driver, and on PostgreSQL the batch cost five
round trips (BEGIN, each statement, COMMIT: execute() waits for each reply before it sends
the next); a fleet of quick steps pays them once a step. Here each statement is one driver
call, and PostgreSQL's batch goes in psycopg's pipeline mode, BEGIN to COMMIT, every reply
read at the end: one round trip. Each fenced insert returns its row when the fence let it
in, so the verdict on each version is the insert's own, taken under its lock on the
execution row (SQLite: under the database's write lock), and nothing is read back.

The statements are still SQLAlchemy's, compiled once, and each bind parameter goes
through its type's processor as SQLAlchemy would do (UTCDateTime makes naive datetimes
UTC, or ISO text on SQLite). Driver errors come back as SQLAlchemy's DBAPIError, a dropped
connection invalidated in its pool, so the store translates them as it does every other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import exc
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.expression import ClauseElement

__all__ = ["Direct", "Insert"]


@dataclass(frozen=True)
class _Compiled:
    sql: str
    positions: tuple[str, ...] | None  # bind names in order, for a positional paramstyle
    processors: dict[str, Callable[[Any], Any]]

    def params(self, values: dict[str, Any]) -> dict[str, Any] | tuple[Any, ...]:
        if self.processors:
            values = {k: self.processors[k](v) if k in self.processors else v
                      for k, v in values.items()}
        return values if self.positions is None else tuple(values[k] for k in self.positions)


class Direct:
    """The step path's statements in the driver's SQL, and their sending on a pooled
    connection (a SQLAlchemy Connection, checked out and in the usual way)."""

    def __init__(self) -> None:
        self._compiled: dict[ClauseElement, _Compiled] = {}

    def _sql(self, stmt: ClauseElement, dialect: Dialect) -> _Compiled:
        # The statements are built once and kept (the store's, sql_rows' per-shape UPDATEs),
        # and one store's engines all have the same dialect: each is compiled once.
        found = self._compiled.get(stmt)
        if found is None:
            compiled = cast(SQLCompiler, stmt.compile(dialect=dialect))
            processors: dict[str, Callable[[Any], Any]] = {}
            for name, bind in compiled.binds.items():
                process = bind.type.dialect_impl(dialect).bind_processor(dialect)
                if process is not None:
                    processors[name] = process
            positions = tuple(compiled.positiontup or ()) if compiled.positional else None
            found = self._compiled[stmt] = _Compiled(compiled.string, positions, processors)
        return found

    def _execute(self, raw: Any, conn: Connection, stmt: ClauseElement,
                 params: dict[str, Any]) -> Any:
        compiled = self._sql(stmt, conn.dialect)
        cursor = raw.cursor()
        cursor.execute(compiled.sql, compiled.params(params))
        return cursor

    def first(self, conn: Connection, stmt: ClauseElement,
              params: dict[str, Any]) -> dict[str, Any] | None:
        """The first row of the read `stmt`, by column name."""
        with _driver(conn) as raw:
            cursor = self._execute(raw, conn, stmt, params)
            try:
                row = cursor.fetchone()
                return None if row is None else \
                    {d[0]: value for d, value in zip(cursor.description, row, strict=True)}
            finally:
                cursor.close()

    def write(self, conn: Connection, inserts: Sequence[Insert],
              upsert: ClauseElement, latest: list[dict[str, Any]],
              updates: Sequence[tuple[ClauseElement, dict[str, Any]]]
              ) -> tuple[list[int | None], list[int]]:
        """Each of `inserts` (its UPDATE first if it has one; both RETURNING the row they
        stored), `upsert` of each of `latest`, each update, in one transaction: the id of the
        row each insert stored (None: none), and each update's row count. PostgreSQL:
        `conn` in autocommit, and BEGIN to COMMIT go in one round trip; SQLite: `conn` in
        its write transaction, committed by the caller."""
        rest = [*((upsert, row) for row in latest), *updates]
        cursors: list[Any] = []
        with _driver(conn) as raw:
            try:
                if conn.dialect.name == "postgresql":
                    with raw.pipeline():
                        raw.execute("BEGIN")
                        # A cursor per row: executemany(returning=True) waits for replies.
                        sent = [[self._execute(raw, conn, *stmt) for stmt in each.statements()]
                                for each in inserts]
                        cursors += [cursor for each in sent for cursor in each]
                        cursors += [self._execute(raw, conn, *each) for each in rest]
                        raw.execute("COMMIT")
                    # The pipeline's end read every reply.
                    stored = [_first_id(each) for each in sent]
                else:
                    # Each RETURNING read at once: SQLite cannot commit while a write
                    # statement is unfinished (and sqlite3's executemany refuses RETURNING).
                    stored = []
                    for each in inserts:
                        found = None
                        for stmt in each.statements():
                            cursors.append(self._execute(raw, conn, *stmt))
                            row = cursors[-1].fetchall()
                            found = row[0][0] if row else found
                            if found is not None:
                                break  # written over the row it supersedes
                        stored.append(found)
                    cursors += [self._execute(raw, conn, *each) for each in rest]
                counted = cursors[len(cursors) - len(updates):]  # the updates come last
                return stored, [cursor.rowcount for cursor in counted]
            finally:
                for cursor in cursors:
                    cursor.close()


@dataclass(frozen=True)
class Insert:
    """One version's insert, and the UPDATE that writes it over the row of the version it
    supersedes instead, if any (sql_rows.build_superseding_update): the insert after it
    stores nothing if the UPDATE did."""

    insert: ClauseElement
    params: dict[str, Any]
    superseding: tuple[ClauseElement, dict[str, Any]] | None = None

    def statements(self) -> list[tuple[ClauseElement, dict[str, Any]]]:
        first = [self.superseding] if self.superseding is not None else []
        return [*first, (self.insert, self.params)]


def _first_id(cursors: list[Any]) -> int | None:
    for cursor in cursors:
        row = cursor.fetchone()
        if row is not None:
            return cast(int, row[0])
    return None


@contextmanager
def _driver(conn: Connection) -> Iterator[Any]:
    """The driver's connection under `conn`; its errors raised as SQLAlchemy would raise
    them, a dropped connection invalidated and a failed transaction rolled back, so that
    neither goes back to the pool as it is."""
    raw: Any = conn.connection.dbapi_connection
    dialect = conn.dialect
    error = cast(type[Exception], dialect.loaded_dbapi.Error)
    try:
        yield raw
    except error as err:
        dropped: bool = dialect.is_disconnect(cast(Any, err), raw, None)
        if dropped:
            conn.invalidate(err)
        else:
            with suppress(error):  # the error raised below says what failed
                raw.rollback()
        raise exc.DBAPIError.instance(None, None, err, error, connection_invalidated=dropped,
                                      dialect=dialect) from err
    except BaseException:
        # Not the driver's (a value it cannot encode): a BEGIN may have gone already.
        with suppress(error):
            raw.rollback()
        raise
