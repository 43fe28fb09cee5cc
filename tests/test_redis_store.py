"""Redis-specific behaviour, on the real servers (the contract itself, append_if_new()
included, is in test_store_conformance.py; the tiered store's in test_tiered_store.py).
Only keys under this test's prefix are ever deleted."""

from __future__ import annotations

import time
from collections.abc import Iterator

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
    StoreError,
    StoreUnavailableError,
)
from livingai_tasks.stores.redis import RedisStore

from .conftest import REDIS_URL

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




# -- an idempotent step's input stored once (write() across stores: the conformance suite)


def _started(store: RedisStore, eid: str) -> ExecutionNode:
    """A step's RUNNING version, appended the way a step starts on Redis (append_if_new)."""
    store.create_execution(Execution(id=eid))
    running = node(eid, 1, status=Status.RUNNING, input={"args": [{"big": "x" * 2000}]},
                   metadata={"fence": 0, "idempotent": True})
    assert store.append_if_new(running, {}) is None
    return running


def test_an_outcome_takes_the_place_of_the_running_version_a_step_started_with(
        redis_store: RedisStore) -> None:
    running = _started(redis_store, "e1")
    done = running.evolve(status=Status.SUCCESS, output={"ok": 1})
    redis_store.write([done], ())
    assert redis_store.node_versions(running.id) == [done]  # the input is stored once
    assert redis_store.get_node(running.id) == done


def test_a_version_with_a_checkpoint_is_never_replaced(redis_store: RedisStore) -> None:
    running = _started(redis_store, "e1")
    saved = running.evolve(checkpoint=b"\x00state")
    redis_store.write([saved, saved.evolve(status=Status.SUCCESS, checkpoint=None)], ())
    versions = redis_store.node_versions(running.id)
    assert [v.checkpoint for v in versions] == [b"\x00state", None]  # the start superseded
    assert redis_store.latest_checkpoint("e1") == saved


# -- versions staged beside the scripts (redis_scripts.py, place()) -----------------------


def _stage_keys(store: RedisStore) -> list[bytes]:
    client = raw_client()
    try:
        return list(client.scan_iter(match=f"{store.keys.prefix}:stage:*"))
    finally:
        client.close()


def test_an_outcome_replaces_a_retried_attempt_s_start_and_nothing_before_it(
        redis_store: RedisStore) -> None:
    first = _started(redis_store, "e1")
    retrying = first.evolve(status=Status.RETRYING)
    redis_store.append([retrying])
    again = first.evolve(metadata={**first.metadata, "attempt": 2})
    redis_store.write([again], ())  # the list is now three long, `again` its latest
    done = again.evolve(status=Status.SUCCESS, output={"ok": 1})
    redis_store.write([done], ())
    assert redis_store.node_versions(first.id) == [first, retrying, done]
    assert _stage_keys(redis_store) == []


def test_a_refused_or_existing_version_leaves_no_staged_copy(redis_store: RedisStore) -> None:
    running = _started(redis_store, "e1")
    assert redis_store.append_if_new(running.evolve(output={"x": 1}), {}) == running
    assert redis_store.claim("e1", fence=0, owner="recovery", lease_s=30)
    assert redis_store.write([running.evolve(status=Status.SUCCESS)], ()).nodes == (running.id,)
    assert redis_store.node_versions(running.id) == [running]
    assert _stage_keys(redis_store) == []


def test_a_staged_copy_a_failed_script_left_never_reaches_a_node(
        redis_store: RedisStore) -> None:
    redis_store.create_execution(Execution(id="bad"))
    client = raw_client()
    try:
        client.hset(redis_store.keys.execution("bad"), "fence", b"not a number")
        with pytest.raises(StoreError):  # the script fails on the fence it reads
            redis_store.write([node("bad", 1)], ())
        assert _stage_keys(redis_store) != []  # what the failed call left behind
        good = node("e2", 1)
        redis_store.create_execution(Execution(id="e2"))
        redis_store.write([good], ())
        assert redis_store.node_versions(good.id) == [good]  # the leftover was cleared first
        assert redis_store.nodes("bad") == []
    finally:
        client.close()


def test_a_server_that_lost_the_scripts_gets_them_again(redis_store: RedisStore) -> None:
    running = _started(redis_store, "e1")
    client = raw_client()
    try:
        client.script_flush()  # what a restart does; other clients reload theirs the same way
    finally:
        client.close()
    done = running.evolve(status=Status.SUCCESS, output={"ok": 1})
    redis_store.write([done], ())
    assert redis_store.node_versions(running.id) == [done]
    second = node("e1", 2, status=Status.RUNNING)
    assert redis_store.append_if_new(second, {}) is None
    assert _stage_keys(redis_store) == []


def test_calls_are_packed_as_redis_py_packs_them() -> None:
    """redis_calls._resp packs a write call itself (one buffer, a fraction of redis-py's
    time): the bytes must be exactly redis-py's for every kind of argument the calls use."""
    from livingai_tasks.stores.redis_calls import _resp

    commands = [("MULTI",), ("RPUSH", "lai:stage:0", b"\x02\x00" + b"v" * 7000),
                ("EVALSHA", "ab" * 20, 2, "lai:ex:é", "k", -3, 0, 1.5, 1796528624.3399894,
                 b"", "", "naïve ✓"), ("EXEC",)]
    conn = redis.Connection()  # never connects: packing only
    assert _resp(commands) == b"".join(conn.pack_commands(commands))
    for bad in (True, None, object()):
        with pytest.raises(redis.DataError):
            _resp([("SET", "k", bad)])
