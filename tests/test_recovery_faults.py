"""One corrupt record never stops recovery of the others (real PostgreSQL and Redis)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery

import livingai_tasks as lai
from livingai_tasks import Execution, ExecutionNode, NodeType, Settings, Status
from livingai_tasks.celery_wing.recover import recover_once
from livingai_tasks.nodes import Meta

from .conftest import POSTGRES_URL, REDIS_URL, pg_url


def _orphan(store: Any, eid: str) -> ExecutionNode:
    store.create_execution(Execution(id=eid, lease_deadline=time.time() - 60))
    node = ExecutionNode(id=f"{eid}-n1", execution_id=eid, seq=1, type=NodeType.PROMPT,
                         status=Status.RUNNING, input={"args": [1], "kwargs": {}},
                         metadata={Meta.TASK: "tests.agent_app.step", Meta.IDEMPOTENT: True,
                                   Meta.ATTEMPT: 1})
    store.append([node])
    return node


def _corrupt_postgres(schema: str, node_id: str) -> None:
    engine = sa.create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'UPDATE "{schema}".lai_node_versions SET body = '
                             "substr(body, 1, 25) WHERE node_id = :n"), {"n": node_id})
    engine.dispose()


def _corrupt_redis(prefix: str, node_id: str) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    keys = [k for k in client.scan_iter(match=f"{prefix}:*{node_id}*") if
            client.type(k) == b"list"]
    assert keys, "no version list found to corrupt"
    for key in keys:
        raw = client.lindex(key, -1)
        client.lset(key, -1, raw[: len(raw) // 2])
    client.close()


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_a_corrupt_record_is_skipped_and_the_others_are_resumed(kind: str,
                                                               request: Any) -> None:
    import tests.agent_app  # noqa: F401 - registers the steps recovery may publish

    if kind == "postgres":
        schema = request.getfixturevalue("pg_schema")
        url = pg_url(schema)
    else:
        prefix = request.getfixturevalue("redis_prefix")
        url = f"{REDIS_URL}?prefix={prefix}"
    store = lai.open_store(url)
    store.migrate()
    try:
        bad, good = _orphan(store, "bad"), _orphan(store, "good")
        if kind == "postgres":
            _corrupt_postgres(schema, bad.id)
        else:
            _corrupt_redis(prefix, bad.id)
        app = Celery("recovery-faults", broker="memory://", set_as_current=False)
        settings = Settings(store=url, stuck_after_s=5)
        first = recover_once(app, store, settings, owner="test")
        assert first.unreadable == ["bad"] and first.claimed == ["good"]
        assert store.get_node(good.id).metadata[Meta.FENCE] == 1  # resumed: fenced, published
        second = recover_once(app, store, settings, owner="test")
        assert second.unreadable == ["bad"]  # skipped again, never blocking the page
    finally:
        store.close()


def _corrupt_execution_row(kind: str, where: str, eid: str) -> None:
    """Edit the execution's metadata in place: valid JSON, failing its checksum."""
    if kind == "postgres":
        engine = sa.create_engine(POSTGRES_URL)
        with engine.begin() as conn:
            conn.execute(sa.text(f'UPDATE "{where}".lai_executions SET metadata = '
                                 "'{\"edited\": 1}' WHERE id = :i"), {"i": eid})
        engine.dispose()
        return
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    client.hset(f"{where}:ex:{eid}", "metadata", b'{"edited": 1}')
    client.close()


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_corrupt_bodies_and_rows_are_skipped_counted_logged_once_and_the_rest_resumed(
        kind: str, request: Any, caplog: pytest.LogCaptureFixture) -> None:
    """Two corrupt orphans (a truncated node body, an execution row failing its checksum)
    among three good ones: one tick resumes all three good ones, skips and counts the bad
    ones on every tick, and logs each bad one once, not once per tick."""
    import uuid

    import tests.agent_app  # noqa: F401 - registers the steps recovery may publish
    from livingai_tasks.celery_wing import runtime
    from livingai_tasks.celery_wing.tasks import RECOVER_TASK

    where = request.getfixturevalue("pg_schema" if kind == "postgres" else "redis_prefix")
    url = pg_url(where) if kind == "postgres" else f"{REDIS_URL}?prefix={where}"
    run = uuid.uuid4().hex[:8]  # ids of this run: each process logs a record once
    store = lai.open_store(url)
    store.migrate()
    app = Celery(f"recovery-faults-{run}", broker="memory://", set_as_current=False)
    lai.install(app, store=url, stuck_after_s=5)
    try:
        good = [_orphan(store, f"good{i}-{run}") for i in range(3)]
        bad_body, bad_row = _orphan(store, f"body-{run}"), _orphan(store, f"row-{run}")
        if kind == "postgres":
            _corrupt_postgres(where, bad_body.id)
        else:
            _corrupt_redis(where, bad_body.id)
        _corrupt_execution_row(kind, where, bad_row.execution_id)
        bad = {bad_body.execution_id, bad_row.execution_id}

        settings = Settings(store=url, stuck_after_s=5)
        first = recover_once(app, store, settings, owner="test")
        assert set(first.unreadable) == bad
        assert sorted(first.claimed) == sorted(n.execution_id for n in good)
        for n in good:
            assert store.get_node(n.id).metadata[Meta.FENCE] == 1  # resumed
        for _ in range(2):  # the recovery task, as beat runs it: counted on every tick
            app.tasks[RECOVER_TASK].apply()
        assert runtime.get().engine.metrics.counter("recovery_unreadable") == 2 * len(bad)
        for eid in bad:
            lines = [r.getMessage() for r in caplog.records
                     if r.name == "livingai_tasks.recovery" and eid in r.getMessage()]
            assert len(lines) == 1, lines  # three ticks, one line
            assert "cannot be recovered" in lines[0]
        row_lines = [r.getMessage() for r in caplog.records
                     if r.name == "livingai_tasks.stores" and bad_row.execution_id in
                     r.getMessage()]
        assert len(row_lines) == 1 and "checksum" in row_lines[0], row_lines
    finally:
        runtime.get().close()
        store.close()


def test_a_tick_right_after_an_outage_its_process_saw_in_a_write_takes_no_worker_for_dead(
        redis_prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool child busy with a step through an outage runs no tick during it, but its
    writer saw the store fail (a real TCP cut): the first tick after the store is back must
    not resume what workers that could not renew held (CI saw a live worker's chain taken
    over so, and a step run twice); once every worker had a chance to renew, it does."""
    import tests.agent_app  # noqa: F401 - registers the steps recovery may publish
    from livingai_tasks import CheckpointEngine
    from livingai_tasks.celery_wing import recover
    from livingai_tasks.engine.store_health import last_failure

    from .tcp_proxy import proxy_for

    monkeypatch.setattr(recover, "_outage", recover._Outage())
    url = f"{REDIS_URL}?prefix={redis_prefix}"
    proxy = proxy_for(REDIS_URL)
    store, cut_store = lai.open_store(url), lai.open_store(proxy.url(url))
    engine = CheckpointEngine(cut_store, budget_ms=50)
    try:
        orphan = _orphan(store, "orphaned")  # its lease ran out during the outage
        cut_at = time.monotonic()
        proxy.cut()
        step = ExecutionNode(id="busy-n1", execution_id="busy", seq=1, type=NodeType.PROMPT,
                             status=Status.RUNNING)
        engine.save(step)  # the busy step's record: its writer fails on the cut
        deadline = time.monotonic() + 10
        while last_failure() <= cut_at and time.monotonic() < deadline:
            time.sleep(0.05)
        assert last_failure() > cut_at, "the writer never saw the cut"
        proxy.restore()
        assert engine.flush(10)
        app = Celery("recovery-faults", broker="memory://", set_as_current=False)
        settings = Settings(store=url, worker_ttl_s=1.0, worker_beat_s=0.5, heartbeat_s=0.5,
                            recovery_interval_s=0.5)
        held = recover_once(app, store, settings, owner="test",
                            store_failed_at=last_failure())
        assert held.held_back and held.claimed == []
        assert held.scanned == 1  # it saw the orphan and planned only
        assert store.get_node(orphan.id).metadata.get(Meta.FENCE, 0) == 0
        time.sleep(1.6)  # past the renew window (worker_ttl_s + recovery_interval_s)
        later = recover_once(app, store, settings, owner="test",
                             store_failed_at=last_failure())
        assert not later.held_back and later.claimed == ["orphaned"]
    finally:
        engine.close()
        cut_store.close()
        store.close()
        proxy.close()
