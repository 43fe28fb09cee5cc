"""sqlite:/// and postgresql+psycopg:// — one SQLAlchemy Core store for both.

The dialects differ only where they must: how the engine is built (SQLite: a WAL file with a
busy timeout, BEGIN IMMEDIATE for writes; PostgreSQL: a small pool, reads of one statement
in autocommit, a write batch in one round trip) and which INSERT ... ON CONFLICT construct
is imported. Schema and migrations live in sql_schema.py, URL parsing in sql_url.py, engine
building in sql_engine.py, row mapping, the fenced insert and the execution updates in
sql_rows.py, the step path's statements sent through the driver directly in sql_direct.py,
worker liveness (TracksWorkers) in sql_workers.py.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine

from ..errors import RecordRefusedError, StoreError, StoreUnavailableError
from ..nodes import Execution, ExecutionNode, ExecutionStatus, utcnow
from ._common import SupersedableVersions, check_page, mask_url, split_if_fence
from .base import Fenced, Updates, fence_of
from .rejected import SQLRejected
from .sql_direct import Direct, Insert
from .sql_engine import SQLITE_BUSY_TIMEOUT_MS, WRITE_OPTION, create_engine
from .sql_rows import (
    LATEST_KEYS,
    build_fenced_insert,
    build_superseding_update,
    execution_from,
    execution_update,
    execution_values,
    node_from,
    node_row,
    readable_executions,
    superseding_params,
)
from .sql_schema import (
    EXECUTIONS,
    MIGRATION_LOCK_KEY,
    MIGRATIONS,
    NODE_LATEST,
    NODE_VERSIONS,
    SCHEMA_VERSION,
)
from .sql_side import SQLSideRecords
from .sql_url import parse_sql_url
from .sql_workers import SQLWorkers

__all__ = ["SQLStore", "SQLITE_BUSY_TIMEOUT_MS"]

# The ids come along with a node body so that a corrupt one can be named (sql_rows.node_from).
_NODE_READ = (NODE_VERSIONS.c.body, NODE_VERSIONS.c.checkpoint, NODE_VERSIONS.c.node_id,
              NODE_VERSIONS.c.execution_id, NODE_VERSIONS.c.seq, NODE_VERSIONS.c.body_crc)
# The reads on a step's path, built once (building a statement costs more than running it
# from SQLAlchemy's compiled cache).
_GET_NODE = (sa.select(*_NODE_READ)
             .join(NODE_LATEST, NODE_LATEST.c.version_id == NODE_VERSIONS.c.id)
             .where(NODE_LATEST.c.node_id == sa.bindparam("node_id")))
_GET_EXECUTION = sa.select(EXECUTIONS).where(EXECUTIONS.c.id == sa.bindparam("execution_id"))


class SQLStore(SQLWorkers, SQLRejected, SQLSideRecords):
    """The Store protocol on SQLite (one file, WAL) or PostgreSQL (psycopg 3), with
    TracksWorkers (sql_workers.py).

    Nothing connects in __init__: the engine is built on first use, and again in a forked
    child (a pool must never be shared across fork). Call migrate() once per database
    before use. Connection failures raise StoreUnavailableError naming the masked URL.

    Fencing: each node version is inserted by `INSERT ... SELECT ... WHERE` its execution's
    fence (read under FOR NO KEY UPDATE on PostgreSQL, so a concurrent claim waits for the
    write or the write sees the claim; SQLite writers hold the database's write lock) is not
    above the node's; the insert returns its row when it stored one, so a refused version
    costs no statement more (sql_direct.py).
    """

    def __init__(self, url: str) -> None:
        self._target = parse_sql_url(url)
        self.url = mask_url(url)
        self._dialect = self._target.dialect
        self._latest_upsert = self._build_latest_upsert()
        self._fenced_insert = build_fenced_insert()
        self._insert_unless_superseding = build_fenced_insert(unless_superseding=True)
        self._superseding_update = build_superseding_update()
        self._supersedable = SupersedableVersions[tuple[int, int]]()  # (row id, body CRC)
        self._direct = Direct()  # the step path's statements (sql_direct.py)
        # start() writes an execution per run: its statements are built once, like the
        # step path's (the values go as parameters).
        insert = self._upsert(EXECUTIONS)
        self._put_execution = insert.on_conflict_do_update(
            index_elements=[EXECUTIONS.c.id],
            set_={c.name: insert.excluded[c.name] for c in EXECUTIONS.c if c.name != "id"})
        self._create_execution = (insert.on_conflict_do_nothing(index_elements=[EXECUTIONS.c.id])
                                  .returning(EXECUTIONS.c.id))  # a row back = inserted
        self._engine: Engine | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._lock_pid = os.getpid()
        # Engines inherited across fork. Their pooled connections share sockets and files
        # with the parent: closing them here would hang up the parent's sessions, so they
        # are kept referenced (never garbage-collected, never used) instead.
        self._inherited: list[Engine] = []

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- connections ------------------------------------------------------------------------
    def _get_engine(self) -> Engine:
        pid = os.getpid()
        engine = self._engine
        if engine is not None and self._pid == pid:
            return engine
        with self._process_lock():
            if self._engine is not None and self._pid == pid:
                return self._engine
            if self._engine is not None:
                self._inherited.append(self._engine)
            self._engine = self._create_engine()
            self._pid = pid
            return self._engine

    def _process_lock(self) -> threading.Lock:
        if self._lock_pid != os.getpid():
            # A lock copied by fork may be held by a parent thread that does not exist here.
            self._lock, self._lock_pid = threading.Lock(), os.getpid()
        return self._lock

    def _create_engine(self) -> Engine:
        return create_engine(self._target, self.url)

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Connection]:
        """A connection in a transaction, committed on success; driver errors translated.
        Every reader (write=False) runs one statement, which PostgreSQL answers from one
        snapshot on its own: it runs in autocommit, without the BEGIN and COMMIT round
        trips (SQLite's are local calls and keep the deferred BEGIN)."""
        try:
            with self._get_engine().connect() as conn:
                if write:
                    conn.execution_options(**{WRITE_OPTION: True})
                elif self._dialect == "postgresql":
                    conn.execution_options(isolation_level="AUTOCOMMIT")
                    yield conn
                    return
                with conn.begin():
                    yield conn
        except (exc.DBAPIError, exc.TimeoutError) as err:
            raise self._translate(err) from err
        except (UnicodeError, exc.StatementError) as err:
            # A driver that cannot encode a value (a lone surrogate) fails before the server
            # sees it: that record can never be written as it is.
            raise RecordRefusedError(f"Store {self.url!r} cannot encode the record: "
                                     f"{type(err).__name__}: {err}") from err

    def _translate(self, err: exc.SQLAlchemyError) -> StoreError:
        orig = getattr(err, "orig", None) or err
        text = str(orig).strip() or type(orig).__name__
        for secret in self._target.secrets:  # drivers do not echo passwords; be sure anyway
            text = text.replace(secret, "***")
        first_line = text.splitlines()[0]  # later lines of a server error echo our SQL
        if getattr(orig, "sqlstate", None) == "42P01" or "no such table" in first_line:
            return StoreError(f"Store {self.url!r} has no livingai_tasks schema yet "
                              f"({first_line}): run `livingai-tasks migrate` or store.migrate() "
                              "first.")
        if isinstance(err, exc.OperationalError | exc.InterfaceError | exc.TimeoutError) or (
            isinstance(err, exc.DBAPIError) and err.connection_invalidated
        ):
            # All of it: libpq's second line ("Is the server running...") helps here.
            return StoreUnavailableError(f"Store {self.url!r} is unavailable: "
                                         f"{' '.join(text.split())}")
        if _refuses_content(err, orig):
            return RecordRefusedError(f"Store {self.url!r} refused the record: {first_line}")
        return StoreError(f"Store {self.url!r} failed: {first_line}")

    def _upsert(self, table: sa.Table) -> postgresql.Insert | sqlite.Insert:
        return postgresql.insert(table) if self._dialect == "postgresql" else sqlite.insert(table)

    def _build_latest_upsert(self) -> postgresql.Insert | sqlite.Insert:
        """Point each node's latest row at its newest version, found server-side.

        max(id) by node_id is one step down the (node_id, id) index, and it needs no id back
        from the inserts (PostgreSQL sends it before any reply has come). Sent for every node
        of a batch, refused versions included, for the same reason: a node whose version was
        refused has no newer id, so its row stays as it is, and a node with no version at all
        gets none.
        """
        newest = (sa.select(sa.func.max(NODE_VERSIONS.c.id).label("id"))
                  .where(NODE_VERSIONS.c.node_id == sa.bindparam("node_id")).subquery())
        values = (sa.select(*(sa.bindparam(k, type_=NODE_LATEST.c[k].type) for k in LATEST_KEYS),
                            newest.c.id)
                  .where(newest.c.id.is_not(None)))
        stmt = self._upsert(NODE_LATEST).from_select([*LATEST_KEYS, "version_id"], values)
        return stmt.on_conflict_do_update(
            index_elements=[NODE_LATEST.c.node_id],
            set_={k: stmt.excluded[k] for k in (*LATEST_KEYS[1:], "version_id")},
            # Two transactions appending the same node may commit out of id order: the
            # highest id stays the latest, as node_versions() orders them.
            where=NODE_LATEST.c.version_id < stmt.excluded.version_id,
        )

    # -- nodes --------------------------------------------------------------------------------
    def append(self, nodes: Sequence[ExecutionNode]) -> Fenced:
        """Append one version of each node in one transaction; fenced (see write())."""
        return self._write(nodes, (), supersede=False)[0]

    def write(self, nodes: Sequence[ExecutionNode], updates: Updates) -> Fenced:
        """append(nodes) and update_execution() of each update, in one transaction: one
        commit (and one fsync) instead of one per record. Returns what the fence refused."""
        return self._write(nodes, updates)[0]

    def _write(self, nodes: Sequence[ExecutionNode], updates: Updates, *,
               supersede: bool = True) -> tuple[Fenced, list[bool]]:
        """write(), also saying of each update whether it applied; `supersede`: False
        for append(), which keeps every version."""
        # Serialise first: bad JSON never opens a transaction. Sorted by execution (stably,
        # so a node's versions keep their order) so that concurrent batches lock execution
        # rows in one order and cannot deadlock each other.
        order = sorted(range(len(nodes)), key=lambda i: nodes[i].execution_id)
        rows = [{**node_row(nodes[i]), "fence": fence_of(nodes[i])} for i in order]
        statements = [(eid, split_if_fence(changes), *execution_update(eid, changes))
                      for eid, changes in updates]
        if not rows and not statements:
            return Fenced(), []
        applied: list[bool] = []
        refused_updates: list[str] = []
        # Later in the batch wins: one latest row per node.
        latest = list({r["node_id"]: {k: r[k] for k in LATEST_KEYS} for r in rows}.values())
        single = [(stmt, params) for _, _, stmt, params in statements]
        inserts = self._inserts(rows, supersede)
        # PostgreSQL sends BEGIN to COMMIT itself, from autocommit (sql_direct.py).
        with self._transaction(write=self._dialect == "sqlite") as conn:
            stored, counts = self._direct.write(conn, inserts, self._latest_upsert, latest,
                                                single)
            for (eid, if_fence, _, _), count in zip(statements, counts, strict=True):
                applied.append(count == 1)
                if count != 1 and if_fence is not None and conn.scalar(
                        sa.select(EXECUTIONS.c.id).where(EXECUTIONS.c.id == eid)) is not None:
                    refused_updates.append(eid)  # it exists: the fence refused it
        for i, row_id in enumerate(stored):  # a node's latest version comes last
            self._supersedable.written(nodes[order[i]], None if row_id is None else
                                       (row_id, rows[i]["body_crc"]))
        refused = [i for i, row_id in enumerate(stored) if row_id is None]
        in_batch_order = sorted(order[i] for i in refused)
        ids = tuple(dict.fromkeys(nodes[i].id for i in in_batch_order))
        return Fenced(ids, tuple(refused_updates)), applied

    def _inserts(self, rows: list[dict[str, Any]], supersede: bool) -> list[Insert]:
        """Each row's insert, or its write over the row of the version it supersedes if that
        is still the node's latest (sql_rows.build_superseding_update)."""
        replacing = self._supersedable.firsts(row["node_id"] for row in rows) if supersede \
            else [None] * len(rows)
        return [Insert(self._fenced_insert, row) if replaces is None else
                Insert(self._insert_unless_superseding, {**row, "replaces": replaces[0]},
                       (self._superseding_update, superseding_params(row, replaces)))
                for row, replaces in zip(rows, replacing, strict=True)]

    def get_node(self, node_id: str) -> ExecutionNode | None:
        with self._transaction(write=False) as conn:
            row = self._direct.first(conn, _GET_NODE, {"node_id": node_id})
        return None if row is None else node_from(row)

    def node_versions(self, node_id: str) -> list[ExecutionNode]:
        query = (sa.select(*_NODE_READ)
                 .where(NODE_VERSIONS.c.node_id == node_id).order_by(NODE_VERSIONS.c.id))
        with self._transaction(write=False) as conn:
            return [node_from(row) for row in conn.execute(query).mappings()]

    def nodes(self, execution_id: str) -> list[ExecutionNode]:
        query = (sa.select(*_NODE_READ)
                 .join(NODE_LATEST, NODE_LATEST.c.version_id == NODE_VERSIONS.c.id)
                 .where(NODE_LATEST.c.execution_id == execution_id)
                 .order_by(NODE_LATEST.c.seq, NODE_LATEST.c.created_at, NODE_LATEST.c.node_id))
        with self._transaction(write=False) as conn:
            return [node_from(row) for row in conn.execute(query).mappings()]

    def latest_checkpoint(self, execution_id: str) -> ExecutionNode | None:
        query = (sa.select(*_NODE_READ)
                 .where(NODE_VERSIONS.c.execution_id == execution_id,
                        NODE_VERSIONS.c.checkpoint.is_not(None))  # matches the partial index
                 .order_by(NODE_VERSIONS.c.seq.desc(), NODE_VERSIONS.c.id.desc()).limit(1))
        with self._transaction(write=False) as conn:
            row = conn.execute(query).mappings().first()
        return None if row is None else node_from(row)

    # -- executions ---------------------------------------------------------------------------
    def put_execution(self, execution: Execution) -> None:
        """Insert the execution or overwrite every column of it (fence included)."""
        with self._transaction(write=True) as conn:
            conn.execute(self._put_execution, execution_values(execution))

    def create_execution(self, execution: Execution) -> bool:
        """Insert if absent; True if this call inserted it."""
        with self._transaction(write=True) as conn:
            return conn.execute(self._create_execution,
                                execution_values(execution)).first() is not None

    def update_execution(self, execution_id: str, **changes: Any) -> bool:
        """Set the given fields (see EXECUTION_FIELDS); a missing execution is a no-op.
        True if applied (with if_fence: only while the fence is <= it)."""
        return self._write((), [(execution_id, changes)])[1][0]

    def get_execution(self, execution_id: str) -> Execution | None:
        with self._transaction(write=False) as conn:
            row = conn.execute(_GET_EXECUTION, {"execution_id": execution_id}).mappings().first()
        return None if row is None else execution_from(row)

    def list_executions(
        self,
        *,
        status: ExecutionStatus | None = None,
        lease_expired_before: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Execution]:
        """Newest created first; with lease_expired_before, expired leases oldest first."""
        check_page(limit, offset)
        query = sa.select(EXECUTIONS)
        if status is not None:
            query = query.where(EXECUTIONS.c.status == ExecutionStatus(status).value)
        if lease_expired_before is not None:
            deadline = EXECUTIONS.c.lease_deadline
            query = (query.where(deadline.is_not(None), deadline < float(lease_expired_before))
                     .order_by(deadline, EXECUTIONS.c.id))
        else:
            query = query.order_by(EXECUTIONS.c.created_at.desc(), EXECUTIONS.c.id.desc())
        with self._transaction(write=False) as conn:
            rows = conn.execute(query.limit(limit).offset(offset)).mappings().all()
        return readable_executions(rows, self.url)

    def claim(self, execution_id: str, *, fence: int, owner: str, lease_s: float,
              now: float | None = None) -> bool:
        """Compare-and-set on the fence and the lease's expiry in one UPDATE (PostgreSQL
        re-checks both on the row a concurrent renewal committed): of N claimers, one wins."""
        now = time.time() if now is None else float(now)
        deadline = EXECUTIONS.c.lease_deadline
        stmt = (EXECUTIONS.update()
                .where(EXECUTIONS.c.id == execution_id, EXECUTIONS.c.fence == fence,
                       sa.or_(deadline.is_(None), deadline < now))
                .values(fence=EXECUTIONS.c.fence + 1, lease_owner=owner,
                        lease_deadline=now + lease_s,
                        attempts=EXECUTIONS.c.attempts + 1))
        with self._transaction(write=True) as conn:
            return conn.execute(stmt).rowcount == 1

    # -- lifecycle ----------------------------------------------------------------------------
    def migrate(self) -> None:
        """Apply the missing MIGRATIONS in one transaction. Idempotent and safe to run from
        several processes at once (PostgreSQL: advisory lock; SQLite: BEGIN IMMEDIATE)."""
        for attempt in range(5):
            try:
                self._migrate()
                return
            except StoreUnavailableError as exc:
                # SQLite: connections that open a brand-new file together all switch it to
                # WAL, and that switch can fail at once ("database is locked") instead of
                # waiting. migrate() is idempotent: try again.
                if self._dialect != "sqlite" or "locked" not in str(exc) or attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))

    def _migrate(self) -> None:
        with self._transaction(write=True) as conn:
            if self._dialect == "postgresql":
                conn.execute(sa.select(sa.func.pg_advisory_xact_lock(MIGRATION_LOCK_KEY)))
                if self._target.schema:
                    conn.execute(sa.text(f'CREATE SCHEMA IF NOT EXISTS "{self._target.schema}"'))
            SCHEMA_VERSION.create(conn, checkfirst=True)
            current = conn.scalar(sa.select(sa.func.max(SCHEMA_VERSION.c.version)))
            start = -1 if current is None else int(current)
            if start >= len(MIGRATIONS):
                raise StoreError(f"Store {self.url!r} has schema version {start}, newer than "
                                 f"this livingai_tasks knows ({len(MIGRATIONS) - 1}): upgrade "
                                 "the livingai-tasks package.")
            for version in range(start + 1, len(MIGRATIONS)):
                MIGRATIONS[version](conn)
                conn.execute(SCHEMA_VERSION.insert().values(version=version,
                                                            applied_at=utcnow()))

    def schema_version(self) -> int | None:
        """The applied schema version, or None before the first migrate()."""
        with self._transaction(write=False) as conn:
            if not sa.inspect(conn).has_table(SCHEMA_VERSION.name):
                return None
            value = conn.scalar(sa.select(sa.func.max(SCHEMA_VERSION.c.version)))
        return None if value is None else int(value)

    def close(self) -> None:
        """Dispose of this process's pool. Idempotent; the store reconnects if used again."""
        with self._process_lock():
            engine, self._engine = self._engine, None
            if engine is not None and self._pid == os.getpid():
                engine.dispose()
            elif engine is not None:
                self._inherited.append(engine)


# SQLSTATE classes that depend on the record, not the server's state: 22 data exception
# (a NUL in text, a number out of range), 23 integrity, 54 program limit (index row too
# large). Class 40 (serialization failure, deadlock) is transient and stays retryable.
_REFUSING_SQLSTATE_CLASSES = ("22", "23", "54")


def _refuses_content(err: exc.SQLAlchemyError, orig: object) -> bool:
    sqlstate = getattr(orig, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate[:2] in _REFUSING_SQLSTATE_CLASSES
    # SQLite has no SQLSTATE: its DataError (string or blob too big, datatype mismatch)
    # and IntegrityError are about the record too.
    return isinstance(err, exc.DataError | exc.IntegrityError) or isinstance(
        orig, UnicodeError | OverflowError)
