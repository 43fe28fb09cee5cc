"""Redis- and tiered-specific behaviour, on the real servers (the contract itself is in
test_store_conformance.py). Only keys under this test's prefix are ever deleted."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import pytest
import redis

from livingai_tasks import (
    ConfigError,
    Execution,
    ExecutionNode,
    ExecutionStatus,
    NodeType,
    NotJSONSerializableError,
    RecordError,
    Status,
    StoreUnavailableError,
    open_store,
)
from livingai_tasks.stores import tiered as tiered_module
from livingai_tasks.stores.redis import RedisStore
from livingai_tasks.stores.tiered import TieredStore

from .conftest import REDIS_URL, pg_url, race

UNREACHABLE_REDIS = "redis://:secret@127.0.0.1:1/0"


def node(execution_id: str, seq: int, **kw: object) -> ExecutionNode:
    return ExecutionNode(execution_id=execution_id, type=NodeType.PROMPT, seq=seq,
                         **kw)  # type: ignore[arg-type]


def raw_client() -> redis.Redis:
    return redis.Redis.from_url(REDIS_URL)


def delete_prefix(prefix: str) -> int:
    """What a Redis restart without persistence does to this prefix (never FLUSHALL)."""
    client = raw_client()
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()
    return len(keys)


@pytest.fixture
def redis_store(redis_prefix: str) -> Iterator[RedisStore]:
    s = RedisStore(f"{REDIS_URL}?prefix={redis_prefix}")
    yield s
    s.close()


def tiered_url(prefix: str, durable: str, redis_url: str = REDIS_URL) -> str:
    return f"tiered+{redis_url}?prefix={prefix}&durable={quote(durable, safe='')}"


@pytest.fixture
def tiered(redis_prefix: str, pg_schema: str) -> Iterator[TieredStore]:
    s = TieredStore(tiered_url(redis_prefix, pg_url(pg_schema)))
    s.migrate()
    yield s
    s.close()


# -- URLs and errors ----------------------------------------------------------------------


@pytest.mark.parametrize("url, match", [
    ("redis://127.0.0.1:6379/0?colour=red", "Accepted: prefix=.*socket_timeout"),
    ("redis://127.0.0.1:6379/0?prefix=a:b", r"\[A-Za-z0-9_.-\]"),
    ("redis://127.0.0.1:6379/0?prefix=", "prefix"),
    ("redis://127.0.0.1:6379/0?socket_timeout=0", "socket_timeout must be .* > 0"),
    ("redis://127.0.0.1:6379/0?socket_timeout=soon", "socket_timeout"),
    ("redis://127.0.0.1:6379/zero", "database number"),
    ("redis://127.0.0.1:99999/0", "invalid port"),
    ("redis://127.0.0.1/0?prefix=a&prefix=b", "twice"),
    ("http://127.0.0.1:6379/0", "redis:// or rediss://"),
])
def test_bad_redis_urls_say_what_is_accepted(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        RedisStore(url)


def test_url_errors_never_echo_query_values() -> None:
    with pytest.raises(ConfigError) as info:
        RedisStore("redis://127.0.0.1:6379/0?password=hunter2")
    assert "hunter2" not in str(info.value) and "'password'" in str(info.value)


def test_rediss_and_defaults_parse_without_connecting() -> None:
    s = RedisStore("rediss://user:pw@example.invalid:6380/3")
    assert s.keys.prefix == "lai" and s.url == "rediss://user:***@example.invalid:6380/3"
    s.close()


def test_password_is_masked_in_url_and_unreachable_error() -> None:
    s = RedisStore(UNREACHABLE_REDIS)  # lazy: nothing connects yet
    assert "secret" not in s.url and "***" in s.url
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as info:
        s.get_node("x")
    assert "secret" not in str(info.value)
    assert "127.0.0.1:1" in str(info.value)
    assert time.monotonic() - started < 2.0  # no long retry loop on a refused connection
    s.close()


@pytest.mark.parametrize("url, match", [
    ("tiered+redis://127.0.0.1:6379/0?prefix=x", "durable="),
    ("tiered+redis://127.0.0.1:6379/0?durable=sqlite%3A%2F%2F%2Fx.db", "PostgreSQL URL"),
    ("tiered+redis://127.0.0.1:6379/0?durable=postgresql%3A%2F%2Fh%2Fd&colour=1",
     "Accepted: durable=.*prefix"),
    # An unencoded durable URL splits at its own '&': the error says to encode it.
    ("tiered+redis://127.0.0.1/0?durable=postgresql://h/d?schema=a&connect_timeout=2",
     "URL-encode"),
])
def test_bad_tiered_urls_say_what_is_accepted(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        open_store(url)


def test_tiered_url_masks_both_passwords() -> None:
    durable = "postgresql+psycopg://app:pgsecret@127.0.0.1:5432/test?schema=s"
    s = TieredStore(tiered_url("p", durable, "redis://:redissecret@127.0.0.1:6379/0"))
    assert "pgsecret" not in s.url and "redissecret" not in s.url
    assert s.hot.keys.prefix == "p"
    s.close()


# -- the Redis store ----------------------------------------------------------------------


def test_two_prefixes_do_not_see_each_other(redis_prefix: str) -> None:
    other = f"{redis_prefix}-other"
    a = RedisStore(f"{REDIS_URL}?prefix={redis_prefix}")
    b = RedisStore(f"{REDIS_URL}?prefix={other}")
    try:
        n = node("e1", 1, checkpoint=b"\x00a")
        a.append([n])
        a.create_execution(Execution(id="e1", lease_deadline=1.0))
        assert b.get_node(n.id) is None and b.nodes("e1") == []
        assert b.latest_checkpoint("e1") is None and b.get_execution("e1") is None
        assert b.list_executions() == [] and b.list_executions(lease_expired_before=2.0) == []
        assert b.create_execution(Execution(id="e1", fence=5)) is True
        assert a.get_execution("e1").fence == 0
    finally:
        a.close()
        b.close()
        delete_prefix(other)


def test_lease_and_status_indexes_are_sorted_sets(redis_store: RedisStore) -> None:
    keys, client = redis_store.keys, raw_client()
    try:
        redis_store.create_execution(Execution(id="a", lease_deadline=100.25))
        redis_store.create_execution(Execution(id="b", lease_deadline=50.5))
        redis_store.create_execution(Execution(id="c"))
        assert client.type(keys.leases) == b"zset"
        assert client.zrange(keys.leases, 0, -1, withscores=True) == [(b"b", 50.5), (b"a", 100.25)]
        redis_store.update_execution("b", lease_deadline=None, status=ExecutionStatus.FAILED)
        assert client.zrange(keys.leases, 0, -1) == [b"a"]
        assert client.zrange(keys.status(ExecutionStatus.FAILED), 0, -1) == [b"b"]
        assert sorted(client.zrange(keys.status(ExecutionStatus.RUNNING), 0, -1)) == [b"a", b"c"]
        assert redis_store.claim("c", fence=0, owner="w1", lease_s=30) is True
        deadline = client.zscore(keys.leases, "c")
        assert deadline == redis_store.get_execution("c").lease_deadline
        assert time.time() + 25 < deadline <= time.time() + 30
        redis_store.put_execution(Execution(id="a", status=ExecutionStatus.COMPLETED))
        assert client.zscore(keys.leases, "a") is None
        assert client.zscore(keys.status(ExecutionStatus.RUNNING), "a") is None
        assert client.zscore(keys.status(ExecutionStatus.COMPLETED), "a") is not None
    finally:
        client.close()


def test_append_if_new_writes_a_first_version_with_its_lease_or_nothing(
        redis_store: RedisStore) -> None:
    redis_store.create_execution(Execution(id="e1"))
    deadline = time.time() + 30
    first = node("e1", 1, status=Status.RUNNING, input={"args": [1]})
    lease = {"current_node_id": first.id, "lease_owner": "w1", "lease_deadline": deadline}
    assert redis_store.append_if_new(first, lease) is None
    assert redis_store.node_versions(first.id) == [first]
    assert [n.id for n in redis_store.nodes("e1")] == [first.id]
    got = redis_store.get_execution("e1")
    assert (got.current_node_id, got.lease_owner) == (first.id, "w1")
    assert [e.id for e in redis_store.list_executions(lease_expired_before=deadline + 1)] == ["e1"]
    # A second delivery of the step: the store answers with what it has and writes nothing.
    again = first.evolve(metadata={"attempt": 2})
    assert redis_store.append_if_new(again, {"lease_owner": "w2"}) == first
    assert redis_store.node_versions(first.id) == [first]
    assert redis_store.get_execution("e1").lease_owner == "w1"
    with pytest.raises(RecordError, match="without a checkpoint"):
        redis_store.append_if_new(node("e1", 2, checkpoint=b"\x00s"), {})


def _first_writer(url: str, owner: str, start: Any, results: Any) -> None:
    s = open_store(url)
    s.get_node("warm-up")  # connect before the start line: the race is on the write
    start.wait(10)
    mine = ExecutionNode(id="raced", execution_id="race", type=NodeType.TOOL,
                         status=Status.RUNNING, metadata={"owner": owner})
    results.put((owner, s.append_if_new(mine, {"lease_owner": owner}) is None))
    s.close()


def test_append_if_new_lets_exactly_one_of_n_processes_write(redis_prefix: str) -> None:
    url = f"{REDIS_URL}?prefix={redis_prefix}"
    store = open_store(url)
    store.create_execution(Execution(id="race"))
    outcomes = race(_first_writer, [(url, f"w{i}") for i in range(8)])
    winners = [owner for owner, wrote in outcomes if wrote]
    assert len(winners) == 1, outcomes
    versions = store.node_versions("raced")
    assert [v.metadata["owner"] for v in versions] == winners
    assert store.get_execution("race").lease_owner == winners[0]
    store.close()


def test_a_bad_record_in_a_batch_writes_nothing(redis_store: RedisStore) -> None:
    good = node("e1", 1, checkpoint=b"\x00ok")
    bad = node("e1", 2, output={"when": object()})
    with pytest.raises(NotJSONSerializableError):
        redis_store.append([good, bad])
    assert redis_store.get_node(good.id) is None and redis_store.latest_checkpoint("e1") is None


def test_corrupt_stored_data_is_a_record_error(redis_store: RedisStore) -> None:
    client = raw_client()
    try:
        client.rpush(redis_store.keys.versions("n1"), b"\x07garbage")
        client.hset(redis_store.keys.execution("e1"), "status", b"{not json")
    finally:
        client.close()
    with pytest.raises(RecordError, match="format"):
        redis_store.get_node("n1")
    with pytest.raises(RecordError, match="JSON"):
        redis_store.get_execution("e1")


def test_a_forked_child_gets_its_own_client(redis_store: RedisStore) -> None:
    redis_store.get_node("warm-up")
    parent = redis_store._connection()
    parent.pid = -1  # what the child sees: a connection made by another process
    child = redis_store._connection()
    assert child is not parent and child.client is not parent.client
    assert redis_store.get_node("still-works") is None


# -- the tiered store ---------------------------------------------------------------------


def test_tiered_reads_survive_redis_losing_its_data(tiered: TieredStore, redis_prefix: str) -> None:
    a = node("e1", 1, status=Status.RUNNING, checkpoint=b"\x00one")
    b = node("e1", 2, status=Status.RUNNING)
    tiered.append([a, b])
    tiered.append([a.evolve(status=Status.SUCCESS, output={"ok": 1}, checkpoint=b"\x00two")])
    tiered.create_execution(Execution(id="e1", lease_deadline=time.time() - 5))
    assert tiered.claim("e1", fence=0, owner="w1", lease_s=60) is True
    before = (tiered.nodes("e1"), tiered.node_versions(a.id), tiered.latest_checkpoint("e1"),
              tiered.get_execution("e1"))
    assert tiered.hot.get_node(a.id) is not None  # it was cached

    assert delete_prefix(redis_prefix) > 0  # Redis restarted without persistence
    assert tiered.hot.get_node(a.id) is None and tiered.hot.get_execution("e1") is None
    after = (tiered.nodes("e1"), tiered.node_versions(a.id), tiered.latest_checkpoint("e1"),
             tiered.get_execution("e1"))
    assert after == before
    assert tiered.get_node(a.id) == before[0][0] and tiered.get_node(b.id) == b
    assert tiered.get_execution("e1").fence == 1
    # The fence goes on from PostgreSQL's value, not from Redis's (empty) memory.
    assert tiered.claim("e1", fence=0, owner="w2", lease_s=60) is False
    assert tiered.claim("e1", fence=1, owner="w2", lease_s=60) is True
    assert tiered.hot.get_execution("e1") is None  # executions live in PostgreSQL only
    # Writes after the loss: full lists still come out complete.
    tiered.append([b.evolve(status=Status.SUCCESS)])
    assert [v.status for v in tiered.node_versions(b.id)] == [Status.RUNNING, Status.SUCCESS]
    assert [n.id for n in tiered.nodes("e1")] == [a.id, b.id]


def test_tiered_with_redis_unreachable_uses_postgres(
    pg_schema: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = TieredStore(tiered_url("lai", pg_url(pg_schema), UNREACHABLE_REDIS))
    s.migrate()
    try:
        with caplog.at_level(logging.WARNING, logger="livingai_tasks.stores.tiered"):
            n = node("e1", 1, checkpoint=b"\x00state")
            s.append([n])
            s.append([n.evolve(status=Status.SUCCESS)])
            assert s.create_execution(Execution(id="e1")) is True
            s.update_execution("e1", current_node_id=n.id)
            assert s.claim("e1", fence=0, owner="w1", lease_s=10) is True
            assert s.get_node(n.id).status is Status.SUCCESS
            assert s.latest_checkpoint("e1").checkpoint == b"\x00state"
            assert [v.status for v in s.node_versions(n.id)] == [Status.PENDING, Status.SUCCESS]
            assert s.get_execution("e1").current_node_id == n.id
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "secret" not in warnings[0].getMessage()
        assert s.redis_failures >= 1 and s.redis_outages == 1
    finally:
        s.close()


def test_tiered_write_fails_when_postgres_is_down(redis_prefix: str) -> None:
    durable = "postgresql+psycopg://postgres:pgsecret@127.0.0.1:1/test?connect_timeout=1"
    s = TieredStore(tiered_url(redis_prefix, durable))
    n = node("e1", 1)
    try:
        with pytest.raises(StoreUnavailableError) as info:
            s.append([n])
        assert "pgsecret" not in str(info.value)
        assert s.hot.get_node(n.id) is None  # PostgreSQL first: Redis never saw it
    finally:
        s.close()


def test_tiered_drops_what_redis_missed_before_using_it_again(
    tiered: TieredStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Redis that comes back with its old data (appendonly) must not serve it."""
    monkeypatch.setattr(tiered_module, "REDIS_RETRY_S", 0.0)
    n = node("e1", 1, status=Status.RUNNING, checkpoint=b"\x00old")
    tiered.append([n])
    tiered.create_execution(Execution(id="e1"))
    newer = n.evolve(status=Status.SUCCESS, checkpoint=b"\x00new")

    def down(*args: object, **kwargs: object) -> None:
        raise StoreUnavailableError("Redis at test is unreachable (simulated)")

    with monkeypatch.context() as m:
        m.setattr(tiered.hot, "evict", down)
        m.setattr(tiered.hot, "append", down)
        tiered.append([newer])
    assert tiered.hot.get_node(n.id) == n  # Redis still holds the old version...
    assert tiered.get_node(n.id) == newer  # ...but the tiered store never serves it
    assert tiered.hot.get_node(n.id) is None  # evicted on the way
    assert tiered.latest_checkpoint("e1").checkpoint == b"\x00new"
    assert tiered.redis_outages == 1


def test_tiered_worker_killed_between_the_tiers_leaves_nothing_stale(
        tiered: TieredStore, redis_prefix: str, pg_schema: str) -> None:
    """A worker SIGKILLed after PostgreSQL committed a version and before Redis got it: no
    process is left to fix Redis, so it must not be holding the version from before."""
    n = node("e1", 1, status=Status.RUNNING)
    tiered.append([n])
    assert tiered.hot.get_node(n.id) == n
    done = n.evolve(status=Status.SUCCESS, output={"ok": 1})
    script = textwrap.dedent("""
        import os, signal, sys
        from livingai_tasks import ExecutionNode, open_store
        store = open_store(sys.argv[1])
        store.hot.append = lambda nodes: os.kill(os.getpid(), signal.SIGKILL)
        store.append([ExecutionNode.from_json(sys.argv[2])])
    """)
    url = tiered_url(redis_prefix, pg_url(pg_schema))
    proc = subprocess.run([sys.executable, "-c", script, url, done.to_json()], timeout=60,
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    fresh = open_store(url)
    try:
        assert fresh.get_node(n.id) == done
        assert [v.status for v in fresh.node_versions(n.id)] == [Status.RUNNING, Status.SUCCESS]
    finally:
        fresh.close()


def test_tiered_executions_are_never_served_from_redis(tiered: TieredStore) -> None:
    tiered.create_execution(Execution(id="e1"))
    tiered.update_execution("e1", status=ExecutionStatus.COMPLETED)
    assert tiered.get_execution("e1").status is ExecutionStatus.COMPLETED
    assert tiered.hot.get_execution("e1") is None


def test_tiered_forgets_its_redis_copy_when_postgres_fails_after_commit(
        redis_prefix: str, pg_schema: str) -> None:
    """A PostgreSQL error can arrive after the COMMIT took (a lost reply): Redis must not go
    on serving the version from before it."""
    from livingai_tasks import ExecutionNode, NodeType, Status, StoreUnavailableError

    durable = quote(pg_url(pg_schema), safe="")
    store = open_store(f"tiered+{REDIS_URL}?prefix={redis_prefix}&durable={durable}")
    store.migrate()
    first = ExecutionNode(execution_id="x", type=NodeType.PROMPT, status=Status.RUNNING)
    store.append([first])
    real = store.durable.write

    def commit_then_lose_the_reply(nodes: list[ExecutionNode], updates: Any) -> None:
        real(nodes, updates)
        raise StoreUnavailableError("server closed the connection unexpectedly")

    store.durable.write = commit_then_lose_the_reply
    with pytest.raises(StoreUnavailableError):
        store.append([first.evolve(status=Status.SUCCESS)])
    store.durable.write = real
    assert store.get_node(first.id).status is Status.SUCCESS
    store.close()
