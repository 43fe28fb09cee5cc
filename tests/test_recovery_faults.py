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
