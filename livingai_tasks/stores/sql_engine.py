"""How the SQL store's SQLAlchemy engine is built, per dialect.

PostgreSQL: a small pool whose connections are pinged when they come out of it after a
while unused (a ping on every checkout was one round trip more per transaction). SQLite: a
WAL file with a busy timeout, BEGIN IMMEDIATE for transactions that will write (a connection
marked with WRITE_OPTION), deferred BEGIN for readers.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.engine import Connection, Engine

from ..errors import StoreUnavailableError
from .sql_url import SQLTarget

__all__ = ["create_engine", "WRITE_OPTION", "SQLITE_BUSY_TIMEOUT_MS", "PG_POOL_SIZE",
           "PING_AFTER_IDLE_S"]

SQLITE_BUSY_TIMEOUT_MS = 30_000  # a loaded 2-core box: writers queue behind a slow DDL
PG_POOL_SIZE = 5
# A pooled connection unused for longer is pinged before it is handed out. One used within
# this window needs none: if the server went away meanwhile, the statement fails as
# StoreUnavailableError, which every caller retries (the writer, the entry check, the next
# recovery tick), and SQLAlchemy drops the whole pool on that disconnect.
PING_AFTER_IDLE_S = 1.0
_LAST_USED = "livingai_last_used"  # in a pooled connection's .info

WRITE_OPTION = "livingai_write"  # execution option: this connection's transaction will write


def create_engine(target: SQLTarget, shown: str) -> Engine:
    """The engine for `target`; `shown` is the store's masked URL, for errors."""
    if target.dialect == "postgresql":
        pg = sa.create_engine(
            target.url, connect_args=target.connect_args, pool_size=PG_POOL_SIZE,
            max_overflow=PG_POOL_SIZE, pool_recycle=1800,
            hide_parameters=True,  # node bodies and blobs stay out of error text
        )
        event.listen(pg, "connect", _note_used)
        event.listen(pg, "checkin", _note_used)
        event.listen(pg, "checkout", lambda conn, record, _proxy: _ping_if_idle(pg, conn, record))
        return pg
    folder = Path(target.url.database or "").parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StoreUnavailableError(
            f"Store {shown!r} is unavailable: cannot create the folder {str(folder)!r} "
            f"for the SQLite file ({err.strerror})."
        ) from err
    engine = sa.create_engine(target.url, hide_parameters=True)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _note_used(_dbapi_conn: Any, record: Any) -> None:
    record.info[_LAST_USED] = time.monotonic()


def _ping_if_idle(engine: Engine, dbapi_conn: Any, record: Any) -> None:
    """A connection idle past PING_AFTER_IDLE_S is pinged; a dead one is replaced (the
    pool retries the checkout on DisconnectionError) instead of failing a statement."""
    last = record.info.get(_LAST_USED)
    if last is not None and time.monotonic() - last < PING_AFTER_IDLE_S:
        return
    try:
        engine.dialect.do_ping(dbapi_conn)
    except Exception as err:  # noqa: BLE001 - any failure of the ping means "replace it"
        raise exc.DisconnectionError(f"ping failed: {err}") from err
    record.info[_LAST_USED] = time.monotonic()


def _sqlite_on_connect(dbapi_conn: Any, _record: Any) -> None:
    # Take BEGIN away from the sqlite3 module: its legacy mode skips BEGIN before DDL and
    # SELECT, which would make migrate() non-transactional (see _sqlite_on_begin).
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    # busy_timeout first: switching to WAL briefly needs a lock other processes may hold.
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    # In WAL, NORMAL cannot corrupt the file; a power loss may drop the last commits.
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


def _sqlite_on_begin(conn: Connection) -> None:
    # Writers take the write lock up front: a deferred transaction that upgrades from read to
    # write fails at once with SQLITE_BUSY when another process committed meanwhile, without
    # waiting for busy_timeout. Readers stay deferred so they never block a writer in WAL.
    immediate = conn.get_execution_options().get(WRITE_OPTION, False)
    conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")
