"""Schema version 8: recovery's listings by status and expired lease (RUNNING orphans, due
WAITING executions) read one range of an index on (status, lease_deadline, id). Before it,
PostgreSQL planning with statistics from before a burst of new executions (autoanalyze lags
behind) chose the status index and read every row of the status, so each recovery tick read
every waiting execution (loadtest.waits: the due-wait listing went from 1 ms per tick with
none waiting to 7 ms with 10,000; the query alone, 5.5 ms reading 10,000 rows, against
0.03 ms with the index)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from livingai_tasks import Execution, ExecutionStatus
from livingai_tasks.stores.sql import SQLStore
from livingai_tasks.stores.sql_rows import execution_values
from livingai_tasks.stores.sql_schema import EXECUTIONS, SCHEMA_VERSION_LATEST

from .conftest import pg_url

INDEX = "lai_executions_status_lease"


@pytest.fixture(params=["sqlite", "postgres"])
def sql_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLStore]:
    url = f"sqlite:///{tmp_path}/store.db" if request.param == "sqlite" else \
        pg_url(request.getfixturevalue("pg_schema"))
    store = SQLStore(url)
    store.migrate()
    yield store
    store.close()


def _indexes(store: SQLStore) -> set[str]:
    with store._transaction(write=False) as conn:
        return {str(i["name"]) for i in sa.inspect(conn).get_indexes("lai_executions")}


def test_a_version_7_store_gets_the_index_and_a_new_one_has_it(sql_store: SQLStore) -> None:
    assert INDEX in _indexes(sql_store)  # created with the table (version 0 is today's)
    with sql_store._transaction(write=True) as conn:
        conn.execute(sa.text(f"DROP INDEX {INDEX}"))
        conn.execute(sa.text("DELETE FROM lai_schema_version WHERE version >= 8"))
    assert sql_store.schema_version() == 7
    sql_store.migrate()
    assert sql_store.schema_version() == SCHEMA_VERSION_LATEST
    assert INDEX in _indexes(sql_store)


def _fill(store: SQLStore, waiting: int, expired: int) -> None:
    """Statistics taken while the table was empty, then the rows: a fleet that just started
    thousands of executions, before autoanalyze has looked again."""
    with store._transaction(write=True) as conn:
        conn.execute(sa.text("ANALYZE lai_executions"))
    now = time.time()
    rows = [execution_values(Execution(id=f"w{i:05d}", status=ExecutionStatus.WAITING,
                                       lease_deadline=now + 3600 + i))
            for i in range(waiting)]
    rows += [execution_values(Execution(id=f"r{i:05d}", status=ExecutionStatus.RUNNING,
                                        lease_deadline=now - 60 - i))
             for i in range(expired)]
    with store._transaction(write=True) as conn:
        conn.execute(EXECUTIONS.insert(), rows)


def test_due_waits_are_one_index_range_however_many_wait(pg_schema: str) -> None:
    store = SQLStore(pg_url(pg_schema))
    store.migrate()
    try:
        _fill(store, waiting=10_000, expired=30)
        now = time.time()
        # What the tick asks (wake_due, recover_once): nothing due, the 30 expired.
        assert store.list_executions(status=ExecutionStatus.WAITING,
                                     lease_expired_before=now, limit=100) == []
        assert len(store.list_executions(status=ExecutionStatus.RUNNING,
                                         lease_expired_before=now, limit=100)) == 30
        for status in ("WAITING", "RUNNING"):
            with store._transaction(write=False) as conn:
                plan = "\n".join(conn.scalars(sa.text(
                    "EXPLAIN SELECT * FROM lai_executions WHERE status = :s AND "
                    "lease_deadline IS NOT NULL AND lease_deadline < :now "
                    "ORDER BY lease_deadline, id LIMIT 100"), {"s": status, "now": now}))
            assert INDEX in plan, plan
            assert "lai_executions_status_created" not in plan, plan
    finally:
        store.close()
