"""The SQL schema (SQLite and PostgreSQL) and its migrations: the one place tables are defined.

`MIGRATIONS[v]` upgrades a database from version v - 1 to version v (an empty database is at
version -1). `SQLStore.migrate()` applies the missing ones in one transaction and records each
applied index in `lai_schema_version`. The list only grows: a released migration is never edited.
When a table below changes, freeze the DDL its older migrations emit (copy the old Table into
the migration) and append a migration that brings existing databases to the new shape.

Every table name starts with `lai_` so the schema can share a database with an application.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.types import TypeEngine

__all__ = [
    "METADATA",
    "NODE_VERSIONS",
    "NODE_LATEST",
    "EXECUTIONS",
    "TIER_MISSED",
    "WORKERS",
    "SIDE_RECORDS",
    "SCHEMA_VERSION",
    "MIGRATIONS",
    "SCHEMA_VERSION_LATEST",
    "MIGRATION_LOCK_KEY",
    "UTCDateTime",
]

# pg_advisory_xact_lock key serialising concurrent migrate() calls ("lai_mig" in ASCII).
MIGRATION_LOCK_KEY = 0x6C61695F6D6967


class UTCDateTime(sa.TypeDecorator[datetime]):
    """A tz-aware UTC datetime that reads back equal to what was written.

    PostgreSQL: timestamptz (microsecond precision, like Python). SQLite has no datetime
    type, so it gets fixed-width ISO-8601 text: equal width makes text order time order,
    which list_executions() relies on. Naive datetimes are taken as UTC (as nodes.py does).
    """

    impl = sa.String(32)
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> TypeEngine[Any]:
        if dialect.name == "postgresql":
            return dialect.type_descriptor(sa.TIMESTAMP(timezone=True))
        return dialect.type_descriptor(sa.String(32))

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> Any:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        if dialect.name == "postgresql":
            return value
        return value.isoformat(timespec="microseconds")

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)  # type: ignore[no-any-return]


# Ids sort by code point everywhere, as in the memory store: SQLite's default BINARY collation
# already does; PostgreSQL's database collation may not, so ids get "C" (also a cheaper btree).
_ID = sa.String().with_variant(sa.String(collation="C"), "postgresql")
# SQLite only treats INTEGER PRIMARY KEY as the rowid alias, so BIGINT would lose autoincrement.
_BIGID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
_STATUS = sa.String(16)

METADATA = sa.MetaData()

# One row per appended version; `id` order is append order (the "version order").
NODE_VERSIONS = sa.Table(
    "lai_node_versions",
    METADATA,
    sa.Column("id", _BIGID, primary_key=True, autoincrement=True),
    sa.Column("node_id", _ID, nullable=False),
    sa.Column("execution_id", _ID, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("status", _STATUS, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("body", sa.Text, nullable=False),  # ExecutionNode.to_json(): the source of truth
    sa.Column("checkpoint", sa.LargeBinary, nullable=True),
    # CRC32 of body (stores/corrupt.py); NULL in rows written before version 6: unverified.
    sa.Column("body_crc", sa.BigInteger, nullable=True),
    # AUTOINCREMENT: never reuse a rowid, even if old versions are pruned one day.
    sqlite_autoincrement=True,
)
sa.Index("lai_node_versions_node", NODE_VERSIONS.c.node_id, NODE_VERSIONS.c.id)
# latest_checkpoint(): the furthest step's (highest seq), then the newest of its versions.
# Only rows with a blob are indexed, so the lookup skips the rest.
sa.Index(
    "lai_node_versions_checkpoint_seq",
    NODE_VERSIONS.c.execution_id,
    NODE_VERSIONS.c.seq,
    NODE_VERSIONS.c.id,
    sqlite_where=NODE_VERSIONS.c.checkpoint.is_not(None),
    postgresql_where=NODE_VERSIONS.c.checkpoint.is_not(None),
)

# One row per node pointing at its newest version, so get_node() and nodes() never scan
# versions. seq/created_at are copied here so nodes() is ordered straight from the index.
NODE_LATEST = sa.Table(
    "lai_node_latest",
    METADATA,
    sa.Column("node_id", _ID, primary_key=True),
    sa.Column("execution_id", _ID, nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("version_id", _BIGID, nullable=False),
)
sa.Index(
    "lai_node_latest_execution",
    NODE_LATEST.c.execution_id,
    NODE_LATEST.c.seq,
    NODE_LATEST.c.created_at,
    NODE_LATEST.c.node_id,
)

EXECUTIONS = sa.Table(
    "lai_executions",
    METADATA,
    sa.Column("id", _ID, primary_key=True),
    sa.Column("status", _STATUS, nullable=False),
    sa.Column("current_node_id", _ID, nullable=True),
    sa.Column("lease_owner", sa.String, nullable=True),
    sa.Column("lease_deadline", sa.Double, nullable=True),  # epoch seconds
    sa.Column("fence", sa.BigInteger, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("reason", sa.Text, nullable=True),
    sa.Column("created_at", UTCDateTime, nullable=False),
    sa.Column("updated_at", UTCDateTime, nullable=False),
    sa.Column("metadata", sa.Text, nullable=False),  # JSON object
    sa.Column("metadata_crc", sa.BigInteger, nullable=True),  # as body_crc, of metadata
)
# list_executions(): newest first, with or without a status filter.
sa.Index("lai_executions_created", EXECUTIONS.c.created_at, EXECUTIONS.c.id)
sa.Index(
    "lai_executions_status_created", EXECUTIONS.c.status, EXECUTIONS.c.created_at, EXECUTIONS.c.id
)
# Recovery's expired-lease query. Finished executions clear their lease, so the partial index
# stays as small as the set of executions in flight.
sa.Index(
    "lai_executions_lease",
    EXECUTIONS.c.lease_deadline,
    EXECUTIONS.c.id,
    sqlite_where=EXECUTIONS.c.lease_deadline.is_not(None),
    postgresql_where=EXECUTIONS.c.lease_deadline.is_not(None),
)
# Recovery's listings by status and expired lease (RUNNING orphans, due WAITING executions):
# one range per status. With only the two indexes above, PostgreSQL chose the status index
# and read every row of that status, so each tick read all the waiting executions
# (loadtest.waits: 1 ms of due-wait listing per tick with none waiting, 7 ms with 10,000).
_STATUS_LEASE = sa.Index(
    "lai_executions_status_lease",
    EXECUTIONS.c.status,
    EXECUTIONS.c.lease_deadline,
    EXECUTIONS.c.id,
    sqlite_where=EXECUTIONS.c.lease_deadline.is_not(None),
    postgresql_where=EXECUTIONS.c.lease_deadline.is_not(None),
)

# The tiered store's record of Redis keys that may hold a stale copy: a process that could not
# delete them from Redis before writing PostgreSQL (Redis unreachable from it) writes them here
# first, so that they get deleted even if it dies before Redis answers it again. Any process
# that reaches Redis sweeps them (stores/tiered.py; the queries are in stores/tiered_durable.py).
# Empty outside Redis outages.
TIER_MISSED = sa.Table(
    "lai_tier_missed",
    METADATA,
    sa.Column("id", _BIGID, primary_key=True, autoincrement=True),
    sa.Column("prefix", sa.String, nullable=False),  # the Redis tier's key prefix
    sa.Column("kind", sa.String(16), nullable=False),  # "node" or "checkpoint"
    sa.Column("key", _ID, nullable=False),  # the node's or the execution's id
    sa.Column("recorded_at", UTCDateTime, nullable=False),
    sqlite_autoincrement=True,
)
sa.Index("lai_tier_missed_prefix", TIER_MISSED.c.prefix, TIER_MISSED.c.id)

# TracksWorkers: one liveness row per worker process, replaced by each of its beats.
WORKERS = sa.Table(
    "lai_workers",
    METADATA,
    sa.Column("worker", _ID, primary_key=True),
    sa.Column("expires_at", sa.Double, nullable=False),  # epoch seconds
    sa.Column("owners", sa.Text, nullable=False),  # JSON list: lease owner names
    sa.Column("holding", sa.Text, nullable=False),  # JSON list: execution ids
    sa.Column("counters", sa.Text),  # JSON object: the worker's summed counters (version 5)
    sa.Column("updated_at", UTCDateTime, nullable=False),
)
# dead_workers(): the expired ones, oldest deadline first.
sa.Index("lai_workers_expires", WORKERS.c.expires_at, WORKERS.c.worker)

# KeepsSideRecords: an adapter's own keyed records (LangGraph checkpoints), per space and group.
SIDE_RECORDS = sa.Table(
    "lai_side_records",
    sa.MetaData(),
    sa.Column("space", sa.String(64), primary_key=True),
    sa.Column("grp", _ID, primary_key=True),
    sa.Column("key", _ID, primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
)

# One row per applied migration; the schema version is max(version). Created by migrate()
# itself (before reading it), so it is not part of any migration.
SCHEMA_VERSION = sa.Table(
    "lai_schema_version",
    sa.MetaData(),
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)


REJECTED = sa.Table(
    "lai_rejected",
    sa.MetaData(),
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("execution_id", sa.String(255), nullable=False),
    sa.Column("node_id", sa.String(255)),
    # base64 text: the refused content, which the store must never have to parse again.
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("rejected_at", sa.Float, nullable=False),
)


def _v0_initial(conn: Connection) -> None:
    for table in (NODE_VERSIONS, NODE_LATEST, EXECUTIONS):
        table.create(conn)  # with its indexes
    if conn.dialect.name == "postgresql":
        _pg_toast_settings(conn)


def _pg_toast_settings(conn: Connection) -> None:
    # Storage settings, not schema: they change how fast append() is, never what it returns.
    # Values over ~2 KB go to TOAST, compressed with pglz by default. Checkpoint blobs arrive
    # compressed by codec.py already; on prose-like JSON bodies pglz made a 50 x 20 KB append
    # 3x slower than storing them as they are (lz4: ~20% slower for ~25% less disk). So both
    # are stored uncompressed; stores/README.md says how to choose lz4 instead.
    for column in ("body", "checkpoint"):
        conn.exec_driver_sql(
            f"ALTER TABLE lai_node_versions ALTER COLUMN {column} SET STORAGE EXTERNAL"
        )


Migration = Callable[[Connection], None]

# Index = version. Each runs inside migrate()'s transaction (DDL is transactional on both).
def _v1_checkpoint_by_seq(conn: Connection) -> None:
    # Version 0 ordered checkpoints by insertion (id) alone, and a write that landed late
    # (re-sent after an outage, or queued in a slow worker while the next step ran
    # elsewhere) made an earlier step's state the latest. Names resolve through the store's
    # search_path (its schema).
    conn.execute(sa.text("DROP INDEX IF EXISTS lai_node_versions_checkpoint"))
    conn.execute(sa.text(
        "CREATE INDEX IF NOT EXISTS lai_node_versions_checkpoint_seq ON lai_node_versions "
        "(execution_id, seq, id) WHERE checkpoint IS NOT NULL"))


def _v2_tier_missed(conn: Connection) -> None:
    # Up to schema version 1 a tiered store kept its missed Redis keys in memory only, and a
    # process killed during a Redis outage took them with it.
    TIER_MISSED.create(conn)  # with its index


def _v3_workers(conn: Connection) -> None:
    # Up to schema version 2 liveness was per step only (the execution's lease): what a dead
    # worker had received but not started waited for the stuck timeout.
    WORKERS.create(conn)  # with its index


def _rejected_records(conn: Connection) -> None:
    # Records refused for their content were retried for ever, wedging their writer; now
    # they are set aside here for an operator (`livingai-tasks rejected`).
    REJECTED.create(conn)


def _v5_worker_counters(conn: Connection) -> None:
    # Up to version 4 a worker's counters stayed in its processes and `livingai-tasks stats`
    # could not show a fleet's. Version 3 creates the table from WORKERS, which has the
    # column already: a store created fresh skips the ALTER.
    if "counters" not in {c["name"] for c in sa.inspect(conn).get_columns("lai_workers")}:
        conn.execute(sa.text("ALTER TABLE lai_workers ADD COLUMN counters TEXT"))


# Columns version 6 adds, by table: (name, DDL type).
_CHECKSUM_COLUMNS = {"lai_node_versions": ("body_crc", "BIGINT"),
                     "lai_executions": ("metadata_crc", "BIGINT")}


def _body_checksums(conn: Connection) -> None:
    # A JSON body edited in place (an `args` value changed) was read back silently: bodies
    # now carry a CRC32, checked on read. Existing rows keep NULL and read unverified.
    # Version 0 creates today's tables, so a new database has the columns already: add
    # only those missing (SQLite has no ADD COLUMN IF NOT EXISTS).
    inspector = sa.inspect(conn)
    for table, (column, ddl) in _CHECKSUM_COLUMNS.items():
        if column not in {c["name"] for c in inspector.get_columns(table)}:
            conn.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}"))


def _side_records(conn: Connection) -> None:
    SIDE_RECORDS.create(conn, checkfirst=True)


def _v8_status_lease(conn: Connection) -> None:
    # See _STATUS_LEASE. Version 0 creates today's tables with their indexes, so a new
    # database has it already.
    conn.execute(sa.text(
        "CREATE INDEX IF NOT EXISTS lai_executions_status_lease ON lai_executions "
        "(status, lease_deadline, id) WHERE lease_deadline IS NOT NULL"))


MIGRATIONS: list[Migration] = [
    _v0_initial,
    _v1_checkpoint_by_seq,
    _v2_tier_missed,
    _v3_workers,
    _rejected_records,
    _v5_worker_counters,
    _body_checksums,
    _side_records,
    _v8_status_lease,
]

SCHEMA_VERSION_LATEST = len(MIGRATIONS) - 1
