"""SQLStore behaviour the conformance suite does not cover: migrations, URLs, errors, fork."""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from livingai_tasks import (
    ConfigError,
    Execution,
    ExecutionNode,
    NodeType,
    StoreError,
    StoreUnavailableError,
    open_store,
)
from livingai_tasks.errors import RecordRefusedError
from livingai_tasks.nodes import Meta
from livingai_tasks.stores import sql_direct, sql_engine
from livingai_tasks.stores.sql import SQLITE_BUSY_TIMEOUT_MS, SQLStore
from livingai_tasks.stores.sql_schema import MIGRATIONS, SCHEMA_VERSION_LATEST

from .conftest import POSTGRES_URL, need_postgres, pg_url
from .tcp_proxy import proxy_for


@pytest.fixture(params=["sqlite", "postgres"])
def sql_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty SQL store URL of each dialect (not migrated)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"
    return pg_url(request.getfixturevalue("pg_schema"))


@pytest.fixture
def sql_store(sql_url: str) -> Iterator[SQLStore]:
    store = SQLStore(sql_url)
    yield store
    store.close()


def _version_rows(store: SQLStore) -> list[int]:
    with store._transaction(write=False) as conn:
        return list(conn.scalars(sa.text("SELECT version FROM lai_schema_version ORDER BY 1")))


def test_migrate_twice_is_a_no_op_and_records_the_version(sql_store: SQLStore) -> None:
    assert sql_store.schema_version() is None
    sql_store.migrate()
    assert sql_store.schema_version() == SCHEMA_VERSION_LATEST == len(MIGRATIONS) - 1
    sql_store.migrate()
    assert _version_rows(sql_store) == list(range(len(MIGRATIONS)))


def _indexes(store: SQLStore) -> set[str]:
    with store._transaction(write=False) as conn:
        return {str(i["name"]) for i in sa.inspect(conn).get_indexes("lai_node_versions")}


def test_a_version_0_store_is_upgraded_and_keeps_its_checkpoints(sql_store: SQLStore) -> None:
    """Bring a store to version 0's exact shape (checkpoints indexed by insertion only, no
    lai_tier_missed, lai_workers nor lai_rejected, no checksum columns), write to it, then
    migrate: version 1's index replaces the old one, the tables of versions 2 to 4, the
    counters column of version 5 and the checksum columns of version 6 are there, and the
    data stays, read unverified."""
    sql_store.migrate()
    with sql_store._transaction(write=True) as conn:
        conn.execute(sa.text("DROP INDEX lai_node_versions_checkpoint_seq"))
        conn.execute(sa.text("CREATE INDEX lai_node_versions_checkpoint ON lai_node_versions "
                             "(execution_id, id) WHERE checkpoint IS NOT NULL"))
        conn.execute(sa.text("DROP TABLE lai_tier_missed"))  # version 2's
        conn.execute(sa.text("DROP TABLE lai_workers"))  # version 3's
        conn.execute(sa.text("DROP TABLE lai_rejected"))  # version 4's
        conn.execute(sa.text("ALTER TABLE lai_node_versions DROP COLUMN body_crc"))  # 6's
        conn.execute(sa.text("ALTER TABLE lai_executions DROP COLUMN metadata_crc"))  # 6's
        conn.execute(sa.text("DELETE FROM lai_schema_version WHERE version >= 1"))
    assert sql_store.schema_version() == 0
    step1 = ExecutionNode(execution_id="e1", type=NodeType.PROMPT, seq=1, checkpoint=b"\x00a")
    step2 = ExecutionNode(execution_id="e1", type=NodeType.PROMPT, seq=2, checkpoint=b"\x00b")
    with sql_store._transaction(write=True) as conn:  # as version 0's code wrote them
        for step in (step2, step1):  # step1 landed late
            conn.execute(sa.text(
                "INSERT INTO lai_node_versions (node_id, execution_id, seq, status, "
                "created_at, body, checkpoint) VALUES (:i, :e, :s, :st, :c, :b, :k)"),
                {"i": step.id, "e": "e1", "s": step.seq, "st": step.status.value,
                 "c": step.created_at.isoformat(timespec="microseconds"),
                 "b": step.to_json(), "k": step.checkpoint})
            conn.execute(sa.text("INSERT INTO lai_node_latest (node_id, execution_id, seq, "
                                 "created_at, version_id) SELECT node_id, execution_id, seq, "
                                 "created_at, id FROM lai_node_versions WHERE node_id = :i"),
                         {"i": step.id})

    sql_store.migrate()
    assert sql_store.schema_version() == SCHEMA_VERSION_LATEST
    names = _indexes(sql_store)
    assert "lai_node_versions_checkpoint_seq" in names
    assert "lai_node_versions_checkpoint" not in names
    with sql_store._transaction(write=False) as conn:
        assert sa.inspect(conn).has_table("lai_tier_missed")
        assert sa.inspect(conn).has_table("lai_workers")
        assert sa.inspect(conn).has_table("lai_rejected")
        for table, column in (("lai_node_versions", "body_crc"),
                              ("lai_executions", "metadata_crc")):
            assert column in {c["name"] for c in sa.inspect(conn).get_columns(table)}
    assert sql_store.latest_checkpoint("e1") == step2  # no checksum: read unverified
    assert sql_store.get_node(step1.id) == step1
    sql_store.append([step1.evolve(seq=3)])  # new rows carry one
    with sql_store._transaction(write=False) as conn:
        sums = list(conn.scalars(sa.text("SELECT body_crc FROM lai_node_versions ORDER BY id")))
    assert sums[:2] == [None, None] and sums[2] is not None


def test_concurrent_migrate_calls_are_safe(sql_url: str) -> None:
    stores = [SQLStore(sql_url) for _ in range(4)]
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(stores))

    def run(store: SQLStore) -> None:
        try:
            barrier.wait(10)
            store.migrate()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert errors == []
        assert _version_rows(stores[0]) == list(range(len(MIGRATIONS)))
    finally:
        for s in stores:
            s.close()


def test_store_used_before_migrate_says_how_to_fix_it(sql_store: SQLStore) -> None:
    with pytest.raises(StoreError, match=r"livingai-tasks migrate.*store\.migrate\(\)") as info:
        sql_store.get_node("n1")
    assert not isinstance(info.value, StoreUnavailableError)
    with pytest.raises(StoreError, match="migrate"):
        sql_store.append([ExecutionNode(execution_id="e1", type=NodeType.TOOL)])


def test_migrate_creates_a_missing_postgres_schema() -> None:
    need_postgres()
    schema = f"laitest_{uuid.uuid4().hex[:12]}"
    store = SQLStore(pg_url(schema))
    try:
        store.migrate()
        assert store.schema_version() == SCHEMA_VERSION_LATEST
    finally:
        store.close()
        engine = sa.create_engine(POSTGRES_URL)
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


@pytest.mark.parametrize(
    ("url", "complaint"),
    [
        ("sqlite://", "needs a file path"),
        ("sqlite:///", "needs a file path"),
        ("sqlite:///:memory:", "memory://"),
        ("sqlite://somehost/agents.db", "names a host"),
        ("sqlite:///agents.db?schema=x", "PostgreSQL only"),
        ("sqlite:///agents.db?connect_timeout=-1", "seconds > 0"),
        ("postgresql+psycopg://u@h/db?colour=red", "unknown query parameter.*'colour'"),
        ("postgresql://u@h/db?connect_timeout=soon", "connect_timeout='soon'"),
        ("postgres://u@h/db?connect_timeout=0", "seconds > 0"),
        ("postgresql://u@h/db?schema=a;drop", "lower-case letters"),
        ("postgresql://u@h/db?schema=Agents", "lower-case letters"),
        ("postgresql://u@h/db?schema=pg_agents", "'pg_'"),
        ("postgresql://u@h/db?schema=1agents", "not starting with a digit"),
        ("postgresql://u@h/db?schema=" + "a" * 64, "at most 63"),
        ("postgresql://u@h/db?schema=a&schema=b", "repeats"),
        ("postgresql+psycopg2://u@h/db", "unsupported driver"),
        ("mysql://u@h/db", "unsupported driver"),
    ],
)
def test_bad_urls_are_config_errors(url: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint) as info:
        SQLStore(url)
    assert "Accepted" in str(info.value)


def test_bad_url_error_hides_the_password() -> None:
    with pytest.raises(ConfigError) as info:
        SQLStore("postgresql://u:secret@h/db?colour=red")
    assert "secret" not in str(info.value)


def test_open_store_routes_every_sql_scheme(tmp_path: Path) -> None:
    for url in (f"sqlite:///{tmp_path}/a.db", "postgresql://u@h/db", "postgres://u@h/db",
                "postgresql+psycopg://u@h/db"):
        store = open_store(url)  # nothing connects yet: these hosts need not exist
        assert isinstance(store, SQLStore)
        store.close()


def test_unreachable_server_hides_the_password() -> None:
    store = SQLStore("postgresql+psycopg://postgres:secret@127.0.0.1:1/test?connect_timeout=2")
    assert "secret" not in store.url and "***" in store.url
    with pytest.raises(StoreUnavailableError) as info:
        store.get_execution("e1")
    message = str(info.value)
    assert "secret" not in message
    assert "127.0.0.1:1" in message and "***" in message
    assert "secret" not in str(info.value.__cause__)
    store.close()


def test_a_store_built_before_fork_works_in_the_child(sql_url: str) -> None:
    store = SQLStore(sql_url)
    store.migrate()
    first = ExecutionNode(execution_id="e1", type=NodeType.PROMPT, seq=1)
    store.append([first])  # the parent now holds pooled connections the child inherits
    child_node = ExecutionNode(execution_id="e1", type=NodeType.TOOL, seq=2, output={"by": "child"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # 3.12+: fork with threads around
        pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 1
        try:
            store.append([child_node])
            code = 0 if store.get_node(child_node.id) == child_node else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    try:
        assert os.waitstatus_to_exitcode(status) == 0
        # The child's reconnect must not have hung up the parent's own pooled connections.
        assert store.get_node(child_node.id) == child_node
        assert store.nodes("e1") == [first, child_node]
    finally:
        store.close()


def _postgres_uses_schema_as_written(schema: str) -> bool:
    """What PostgreSQL itself does with a schema name, the way SQLStore hands it over: created
    quoted, then selected through an unquoted search_path option."""
    import psycopg

    dsn = POSTGRES_URL.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(dsn, options=f"-csearch_path={schema}") as conn:
            conn.execute(f'CREATE SCHEMA "{schema}"')
            try:
                return conn.execute("SELECT current_schema()").fetchone() == (schema,)
            finally:
                conn.rollback()
    except psycopg.Error:
        return False


def test_schema_names_are_accepted_exactly_when_postgres_uses_them_as_written() -> None:
    """The check at URL parse time agrees with the real server: a name it accepts migrates,
    and a name it refuses is one PostgreSQL would fold or refuse (so migrate() would fail
    later with "no schema has been selected" or "unacceptable schema name")."""
    need_postgres()
    tag = uuid.uuid4().hex[:12]
    candidates = [f"laitest_{tag}", f"_laitest_{tag}", ("l" * 51 + tag),
                  f"Laitest_{tag}", f"LAITEST_{tag}", f"pg_laitest_{tag}", ("l" * 52 + tag)]
    verdicts = {}
    for schema in candidates:
        try:
            store = SQLStore(pg_url(schema))
        except ConfigError as err:
            assert "lower-case letters" in str(err)
            verdicts[schema] = False
            continue
        verdicts[schema] = True
        try:
            store.migrate()
            assert store.schema_version() == SCHEMA_VERSION_LATEST
        finally:
            store.close()
            engine = sa.create_engine(POSTGRES_URL)
            with engine.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
            engine.dispose()
    assert verdicts == {s: _postgres_uses_schema_as_written(s) for s in candidates}
    assert list(verdicts.values()) == [True] * 3 + [False] * 4


def test_sqlite_busy_timeout_is_what_the_readme_says(tmp_path: Path) -> None:
    store = SQLStore(f"sqlite:///{tmp_path}/store.db")
    try:
        with store._transaction(write=False) as conn:
            applied = conn.exec_driver_sql("PRAGMA busy_timeout").scalar()
    finally:
        store.close()
    assert applied == SQLITE_BUSY_TIMEOUT_MS
    readme = (Path(__file__).parent.parent / "stores" / "README.md").read_text()
    assert re.findall(r"busy_timeout=(\d+)", readme) == [str(applied)]
    assert re.findall(r"waits longer than (\d+) s", readme) == [str(applied // 1000)]


def test_a_claim_waits_for_a_write_that_read_the_fence(sql_url: str) -> None:
    """The fence a node write checked stays current until that write commits: a claim
    arriving meanwhile waits for it, so no record made under the old fence can commit after
    the claim. The write is held open by another session locking the node's latest row
    (after the version's insert checked the fence, before the commit)."""
    if not sql_url.startswith("postgresql"):
        pytest.skip("SQLite writers hold the whole database's write lock: a claim cannot "
                    "come between a check and its commit there")
    store = SQLStore(sql_url)
    store.migrate()
    blocker = SQLStore(sql_url)
    try:
        store.put_execution(Execution(id="e1"))
        first = ExecutionNode(execution_id="e1", type=NodeType.PROMPT, seq=1,
                              metadata={Meta.FENCE: 0})
        store.append([first])
        done: dict[str, float] = {}
        with blocker._transaction(write=True) as conn:
            conn.execute(sa.text("SELECT 1 FROM lai_node_latest WHERE node_id = :n FOR UPDATE"),
                         {"n": first.id})
            writer = threading.Thread(target=lambda: done.update(
                write=time.monotonic(), fenced=bool(store.append([first.evolve(seq=2)]))))
            claimer = SQLStore(sql_url)
            thief = threading.Thread(target=lambda: done.update(
                claim=time.monotonic(),
                won=claimer.claim("e1", fence=0, owner="recovery", lease_s=30)))
            writer.start()
            time.sleep(0.5)  # the writer has checked the fence and waits on the latest row
            thief.start()
            thief.join(1.0)
            assert "claim" not in done  # the claim waits for the write's transaction
        writer.join(10)
        thief.join(10)
        claimer.close()
        assert done["won"] is True and done["fenced"] is False
        assert len(store.node_versions(first.id)) == 2
    finally:
        blocker.close()
        store.close()


@contextmanager
def _behind_a_proxy(pg_schema: str) -> Iterator[tuple[Any, SQLStore]]:
    """A migrated PostgreSQL store with execution e1, reached through a TCP proxy the test
    can cut."""
    need_postgres()
    proxy = proxy_for(POSTGRES_URL)
    store = SQLStore(proxy.url(pg_url(pg_schema)))
    try:
        store.migrate()
        store.create_execution(Execution(id="e1"))
        yield proxy, store
    finally:
        store.close()
        proxy.close()


def test_a_pooled_connection_the_server_dropped_is_replaced_once_idle(
        pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pooled PostgreSQL connections are pinged only after PING_AFTER_IDLE_S unused (a ping
    per checkout was a round trip per transaction). Broken for real (a TCP cut resets every
    open connection): one past the window is pinged and replaced, and the read succeeds;
    one inside it meets the dead socket, the read fails as StoreUnavailableError (which
    every caller retries), and the next read reconnects."""
    with _behind_a_proxy(pg_schema) as (proxy, store):
        monkeypatch.setattr(sql_engine, "PING_AFTER_IDLE_S", 3600.0)  # inside the window
        proxy.cut()
        proxy.restore()
        with pytest.raises(StoreUnavailableError, match="is unavailable"):
            store.get_execution("e1")
        assert store.get_execution("e1") is not None  # a new connection
        monkeypatch.setattr(sql_engine, "PING_AFTER_IDLE_S", 0.0)  # every checkout is "idle"
        proxy.cut()
        proxy.restore()
        found = store.get_execution("e1")
        assert found is not None and found.id == "e1"
        assert proxy.accepted >= 3  # the first connection, and one after each cut


def test_direct_statements_over_a_dropped_connection_fail_then_succeed(
        pg_schema: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL the step path's write batch and read go through psycopg directly, past
    SQLAlchemy's execute() (sql_direct.py): a real TCP cut under a pooled connection must
    still fail them as StoreUnavailableError (which every caller retries), store none of
    the batch, and leave no broken connection in the pool: sent again, each succeeds."""
    with _behind_a_proxy(pg_schema) as (proxy, store):
        node = ExecutionNode(id="n1", execution_id="e1", seq=1, type=NodeType.PROMPT,
                             metadata={Meta.FENCE: 0})
        lease = [("e1", {"lease_owner": "w1", "lease_deadline": time.time() + 30})]
        monkeypatch.setattr(sql_engine, "PING_AFTER_IDLE_S", 3600.0)  # no ping to save it
        proxy.cut()
        proxy.restore()
        with pytest.raises(StoreUnavailableError, match="is unavailable"):
            store.write([node], lease)
        assert store.get_node("n1") is None
        assert not store.write([node], lease)  # a new connection
        assert store.get_node("n1") == node
        found = store.get_execution("e1")
        assert found is not None and found.lease_owner == "w1"
        proxy.cut()
        proxy.restore()
        with pytest.raises(StoreUnavailableError, match="is unavailable"):
            store.get_node("n1")
        assert store.get_node("n1") == node


def test_a_refused_version_is_told_by_its_insert_not_read_back(
        sql_store: SQLStore, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fenced insert returns its row when the fence let the version in, so the verdict
    on each version of a batch is the insert's own: no query reads the executions' fences
    back, whether nothing or something was refused (the batch goes through the driver
    directly, so the statements are counted there). The refused version leaves the node's
    latest as it was."""
    sql_store.migrate()
    sql_store.create_execution(Execution(id="e1"))
    sent: list[str] = []
    real = sql_direct.Direct._execute

    def counting(self: Any, raw: Any, conn: Any, stmt: Any, params: Any) -> Any:
        sent.append(self._sql(stmt, conn.dialect).sql)
        return real(self, raw, conn, stmt, params)

    monkeypatch.setattr(sql_direct.Direct, "_execute", counting)
    first = ExecutionNode(id="n1", execution_id="e1", seq=1, type=NodeType.PROMPT,
                          metadata={Meta.FENCE: 0})
    assert not sql_store.write([first, first.evolve(output="done")], ())
    assert sql_store.claim("e1", fence=0, owner="other", lease_s=30)  # fence 0 -> 1
    fenced = sql_store.write([first.evolve(output="late")], ())
    assert fenced.nodes == ("n1",)
    inserts = [s for s in sent if s.startswith("INSERT INTO lai_node_versions")]
    assert len(inserts) == 3 and len(sent) == 5  # 3 versions, a latest-row upsert per batch
    latest = sql_store.get_node("n1")
    assert latest is not None and latest.output == "done"
    assert [n.output for n in sql_store.node_versions("n1")] == [None, "done"]


def test_a_batch_refused_for_its_content_stores_none_of_it(sql_store: SQLStore) -> None:
    """A value the driver cannot encode (a lone surrogate in an execution's reason) fails
    the whole batch as RecordRefusedError, after its versions may have been sent (on
    PostgreSQL the batch's BEGIN and inserts go ahead of it): none of it is stored, and the
    connection serves the next batch."""
    sql_store.migrate()
    sql_store.create_execution(Execution(id="e1"))
    node = ExecutionNode(id="n1", execution_id="e1", seq=1, type=NodeType.PROMPT,
                         metadata={Meta.FENCE: 0})
    with pytest.raises(RecordRefusedError, match="cannot encode"):
        sql_store.write([node], [("e1", {"reason": "a\ud800b"})])
    assert sql_store.node_versions("n1") == []
    assert not sql_store.write([node], [("e1", {"reason": "fine"})])
    assert sql_store.node_versions("n1") == [node]
    found = sql_store.get_execution("e1")
    assert found is not None and found.reason == "fine"
