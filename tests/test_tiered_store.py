"""Tiered-store behaviour (Redis over PostgreSQL), on the real servers: URLs, fallbacks,
and what Redis may and may not serve after an outage, a data loss or a SIGKILL. The contract
itself, and sweep_hot_tier(), are in test_store_conformance.py. Only keys under this test's
prefix are ever deleted."""

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

from livingai_tasks import (
    ConfigError,
    Execution,
    ExecutionNode,
    ExecutionStatus,
    Status,
    StoreUnavailableError,
    open_store,
)
from livingai_tasks.nodes import Meta
from livingai_tasks.stores import mask_url
from livingai_tasks.stores import tiered as tiered_module
from livingai_tasks.stores.tiered import TieredStore

from .conftest import REDIS_URL, pg_url
from .test_redis_store import UNREACHABLE_REDIS, delete_prefix, node


def tiered_url(prefix: str, durable: str, redis_url: str = REDIS_URL) -> str:
    return f"tiered+{redis_url}?prefix={prefix}&durable={quote(durable, safe='')}"


@pytest.fixture
def tiered(redis_prefix: str, pg_schema: str) -> Iterator[TieredStore]:
    s = TieredStore(tiered_url(redis_prefix, pg_url(pg_schema)))
    s.migrate()
    yield s
    s.close()


# -- URLs ------------------------------------------------------------------------------


@pytest.mark.parametrize("url, match", [
    ("tiered+redis://127.0.0.1:6379/0?prefix=x", "durable="),
    ("tiered+redis://127.0.0.1:6379/0?durable=sqlite%3A%2F%2F%2Fx.db", "PostgreSQL URL"),
    ("tiered+redis://127.0.0.1:6379/0?durable=postgresql%3A%2F%2Fh%2Fd&colour=1",
     "Accepted: durable=.*prefix"),
    # An unencoded durable URL splits at its own '&': the error says to encode it.
    ("tiered+redis://127.0.0.1/0?durable=postgresql://h/d?schema=a&connect_timeout=2",
     "URL-encode"),
    # PostgreSQL would fold it to lower case: refused when the store is built, not at migrate.
    ("tiered+redis://127.0.0.1/0?durable=postgresql%3A%2F%2Fh%2Fd%3Fschema%3DAgents",
     "schema='Agents'.*lower-case letters"),
])
def test_bad_tiered_urls_say_what_is_accepted(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        open_store(url)


def test_tiered_url_masks_both_passwords() -> None:
    durable = "postgresql+psycopg://app:pgsecret@127.0.0.1:5432/test?schema=s"
    raw = tiered_url("p", durable, "redis://:redissecret@127.0.0.1:6379/0")
    s = TieredStore(raw)
    whole = (s.url, repr(s), str(s), mask_url(raw))  # mask_url: what install() logs
    for shown, masks in [*((w, 2) for w in whole), (repr(s.hot), 1), (repr(s.durable), 1)]:
        assert "pgsecret" not in shown and "redissecret" not in shown, shown
        assert shown.count("***") + shown.count("%2A%2A%2A") == masks, shown
    assert s.hot.keys.prefix == "p"
    s.close()


# -- tiers ------------------------------------------------------------------------------


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
    # (Once w1's lease has expired: a claim also needs that.)
    later = time.time() + 61
    assert tiered.claim("e1", fence=0, owner="w2", lease_s=60, now=later) is False
    assert tiered.claim("e1", fence=1, owner="w2", lease_s=60, now=later) is True
    assert tiered.hot.get_execution("e1") is None  # executions live in PostgreSQL only
    # Writes after the loss (made under w2's fence): full lists still come out complete.
    assert not tiered.append([b.evolve(status=Status.SUCCESS, metadata={Meta.FENCE: 2})])
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
    store = open_store(tiered_url(redis_prefix, pg_url(pg_schema)))
    store.migrate()
    first = node("x", 0, status=Status.RUNNING)
    store.append([first])
    real = store.durable.write

    def commit_then_lose_the_reply(nodes: list[ExecutionNode], updates: Any) -> None:
        real(nodes, updates)
        raise StoreUnavailableError("server closed the connection unexpectedly")

    store.durable.write = commit_then_lose_the_reply
    with pytest.raises(StoreUnavailableError):
        store.write([first.evolve(status=Status.SUCCESS)], ())
    store.durable.write = real
    assert store.get_node(first.id).status is Status.SUCCESS
    store.close()


def test_a_version_postgresql_refused_is_never_served_from_redis(tiered: TieredStore) -> None:
    """PostgreSQL's fence decides; Redis, which holds no executions, must not keep or take
    the refused version: not as the node's latest, not as the latest checkpoint."""
    tiered.create_execution(Execution(id="e1"))
    held = node("e1", 1, status=Status.RUNNING, checkpoint=b"\x00held",
                metadata={Meta.FENCE: 0})
    tiered.append([held])
    assert tiered.hot.get_node(held.id) == held  # cached
    tiered.update_execution("e1", lease_deadline=None)
    assert tiered.claim("e1", fence=0, owner="recovery", lease_s=30) is True
    # The paused worker wakes up and records its result under the old fence.
    stale = held.evolve(status=Status.SUCCESS, output={"charged": 1}, checkpoint=b"\x00stale",
                        metadata={Meta.FENCE: 0})
    fresh = node("e1", 2, metadata={Meta.FENCE: 1})
    assert tiered.append([stale, fresh]).nodes == (held.id,)
    assert tiered.hot.get_node(held.id) in (None, held)  # evicted, never the stale one
    assert tiered.get_node(held.id) == held and tiered.node_versions(held.id) == [held]
    assert tiered.hot.latest_checkpoint("e1") in (None, held)
    assert tiered.latest_checkpoint("e1") == held
    assert tiered.hot.get_node(fresh.id) == fresh  # the accepted one is cached as usual
