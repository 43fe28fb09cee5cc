"""Records a store refuses for their content raise RecordRefusedError, not a retryable
StoreError: the writer must never retry them at the head of its queue (issue 17)."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from livingai_tasks.errors import RecordRefusedError, StoreError, StoreUnavailableError
from livingai_tasks.nodes import Execution, ExecutionNode, NodeType


def node(execution_id: str, seq: int, **kw: Any) -> ExecutionNode:
    return ExecutionNode(execution_id=execution_id, type=kw.pop("type", NodeType.PROMPT),
                         seq=seq, **kw)


@pytest.mark.parametrize("store_url", ["postgres", "tiered"], indirect=True)
def test_nul_in_text_is_refused_not_retryable(store: Any) -> None:
    with pytest.raises(RecordRefusedError) as caught:
        store.put_execution(Execution(id="e-nul", reason="bad \x00 byte"))
    assert not isinstance(caught.value, StoreUnavailableError)
    store.append([node("e-ok", 1, input={"text": "fine"})])  # the store itself still works
    assert [n.seq for n in store.nodes("e-ok")] == [1]


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_seq_past_bigint_is_refused(store: Any) -> None:
    with pytest.raises(RecordRefusedError):
        store.append([node("e-big", 2**63)])


@pytest.mark.parametrize("store_url", ["postgres", "sqlite"], indirect=True)
def test_unencodable_string_is_refused(store: Any) -> None:
    with pytest.raises(RecordRefusedError):
        store.put_execution(Execution(id="e-sur", reason="half a pair \ud800"))


@pytest.mark.parametrize("store_url", ["redis"], indirect=True)
def test_redis_wrong_type_is_refused(store: Any, redis_prefix: str) -> None:
    import redis

    from tests.conftest import REDIS_URL

    store.append([node("e-wt", 1)])
    client = redis.Redis.from_url(REDIS_URL)
    keys = [k for k in client.scan_iter(f"{redis_prefix}*") if b"e-wt" in k]
    assert keys, "the store wrote no key naming the execution"
    for key in keys:
        client.delete(key)
        client.set(key, b"not the type the store expects")
    with pytest.raises(StoreError) as caught:
        store.append([node("e-wt", 2)])
    assert isinstance(caught.value, RecordRefusedError), caught.value


@pytest.mark.parametrize("store_url", ["redis"], indirect=True)
def test_redis_a_corrupted_execution_hash_is_refused_and_never_blocks_the_queue(
        store: Any) -> None:
    """A fence that is not a number makes the write script fail on the server (a Lua error,
    which redis-py reports without Redis's "ERR "): refused, so the writer sets the write
    aside and the writes behind it land. (Taken for a retryable error, it was sent again
    for ever and nothing after it landed.)"""
    import redis

    from livingai_tasks.nodes import Status
    from tests.conftest import REDIS_URL

    store.create_execution(Execution(id="e-bad"))
    store.create_execution(Execution(id="e-next"))
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.hset(store.keys.execution("e-bad"), "fence", b"not a number")
    finally:
        client.close()
    with pytest.raises(RecordRefusedError, match="user_script"):
        store.append([node("e-bad", 1)])
    engine = _engine(store)
    try:
        engine.save(node("e-bad", 1, status=Status.SUCCESS), wait=False)
        after = node("e-next", 1, status=Status.SUCCESS)
        engine.save(after, wait=False)
        assert engine.flush(10.0)
        assert store.get_node(after.id) == after
        assert engine.metrics.counter("checkpoint_rejected") == 1
        assert [r.execution_id for r in store.rejected(10)] == ["e-bad"]
    finally:
        engine.close(5.0)


# -- the engine's writer: a refused record never blocks the queue ----------------------


def _engine(store: Any) -> Any:
    from livingai_tasks.engine import CheckpointEngine

    return CheckpointEngine(store)


@pytest.mark.parametrize("store_url", ["postgres", "tiered", "sqlite"], indirect=True)
def test_nul_reason_is_sanitised_and_the_rest_of_the_batch_lands(store: Any) -> None:
    from livingai_tasks.nodes import ErrorInfo, Status

    engine = _engine(store)
    try:
        engine.put_execution(Execution(id="e-bad"))
        engine.put_execution(Execution(id="e-next"))
        assert engine.flush(10.0)
        bad = node("e-bad", 1, status=Status.FAILED,
                   error=ErrorInfo(type="ValueError", message="bad \x00 byte"),
                   output={"echo": "x\x00y"})
        engine.save(bad, wait=False)
        engine.update_execution("e-bad", wait=False, reason="failed: bad \x00 byte")
        for seq in (1, 2):
            engine.save(node("e-next", seq, input={"n": seq}), wait=False)
        assert engine.flush(10.0)
        stored = store.get_node(bad.id)
        assert stored is not None and stored.error is not None
        # The node body is JSON, where a NUL is an escape the store takes: kept as it was.
        assert stored.error.message == "bad \x00 byte"
        assert stored.output == {"echo": "x\x00y"}
        expected = "failed: bad \x00 byte" if store.url.startswith("sqlite") else \
            "failed: bad \\u0000 byte"
        assert store.get_execution("e-bad").reason == expected
        assert [n.seq for n in store.nodes("e-next")] == [1, 2]
        metrics = engine.metrics
        refused_here = 0 if store.url.startswith("sqlite") else 1  # SQLite keeps NULs
        assert metrics.counter("checkpoint_sanitised") == refused_here
        assert metrics.counter("checkpoint_rejected") == 0
        assert metrics.counter("checkpoint_dropped") == 0
    finally:
        engine.close(5.0)


@pytest.mark.parametrize("store_url", ["postgres", "tiered"], indirect=True)
def test_refused_after_sanitising_is_set_aside_and_counted(store: Any,
                                                            caplog: Any) -> None:
    engine = _engine(store)
    try:
        engine.save(node("e-huge", 2**63), wait=False)  # no text to escape: still refused
        engine.save(node("e-fine", 1), wait=False)
        assert engine.flush(10.0)
        assert [n.seq for n in store.nodes("e-fine")] == [1]
        assert store.nodes("e-huge") == []
        assert engine.metrics.counter("checkpoint_rejected") == 1
        assert engine.metrics.counter("checkpoint_dropped") == 0
        lines = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
        assert len(lines) == 1 and "e-huge" in lines[0], lines
        [kept] = store.rejected()
        assert (kept.kind, kept.execution_id) == ("append", "e-huge")
        assert json.loads(kept.payload)["node"]["seq"] == 2**63
        assert "refused" in kept.reason
    finally:
        engine.close(5.0)


@pytest.mark.parametrize("store_url", ["redis"], indirect=True)
def test_redis_sets_aside_a_write_refused_for_a_key_of_the_wrong_type(
        store: Any, store_url: str, caplog: Any) -> None:
    """A key of the wrong type (WRONGTYPE) refuses every write to it, sanitised or not: the
    write is set aside in Redis's own rejected-records area, counted, listed by
    `livingai-tasks rejected`, and the rest of its batch lands."""
    import redis

    from tests.conftest import REDIS_URL
    from tests.test_cli import cli

    stuck = node("e-wrongtype", 1, input={"text": "kept"})
    client = redis.Redis.from_url(REDIS_URL)
    client.set(store.keys.versions(stuck.id), b"a string where a list belongs")
    client.close()
    engine = _engine(store)
    try:
        engine.save(stuck, wait=False)
        engine.save(node("e-fine", 1), wait=False)
        assert engine.flush(10.0)
        assert [n.seq for n in store.nodes("e-fine")] == [1]
        assert engine.metrics.counter("checkpoint_rejected") == 1
        assert engine.metrics.counter("checkpoint_dropped") == 0
        lines = [r.getMessage() for r in caplog.records if "set aside" in r.getMessage()]
        assert len(lines) == 1 and "e-wrongtype" in lines[0], lines
    finally:
        engine.close(5.0)
    [kept] = store.rejected()
    assert (kept.kind, kept.execution_id, kept.node_id) == ("append", "e-wrongtype", stuck.id)
    assert json.loads(kept.payload)["node"]["input"] == {"text": "kept"}
    assert "WRONGTYPE" in kept.reason
    shown = cli("rejected", "--store", store_url)
    assert shown.returncode == 0, shown.stderr
    assert "e-wrongtype" in shown.stdout and stuck.id in shown.stdout
    as_json = json.loads(cli("rejected", "--store", store_url, "--json").stdout)
    assert [r["node_id"] for r in as_json] == [stuck.id]
    assert "WRONGTYPE" in as_json[0]["reason"]


def test_a_store_without_a_rejected_area_gets_the_write_in_the_log(caplog: Any) -> None:
    from livingai_tasks.engine import CheckpointEngine
    from tests.engine_support import ControlledStore

    class RefusingStore(ControlledStore):
        """Refuses every write of one execution for its content, as PostgreSQL would."""

        def write(self, nodes: Any, updates: Any) -> Any:
            if any(n.execution_id == "e-refused" for n in nodes):
                raise RecordRefusedError("refused the record: numeric field overflow")
            return super().write(nodes, updates)

    store = RefusingStore()
    engine = CheckpointEngine(store)
    try:
        engine.save(node("e-refused", 1, input={"text": "a\x00b"}), wait=False)
        engine.save(node("e-other", 1), wait=False)
        assert engine.flush(10.0)
        assert engine.metrics.counter("checkpoint_sanitised") == 1
        assert engine.metrics.counter("checkpoint_rejected") == 1
        [line] = [r.getMessage() for r in caplog.records if "no rejected-records area" in
                  r.getMessage()]
        assert "e-refused" in line and "a\\\\u0000b" in line, line
    finally:
        engine.close(5.0)


@pytest.mark.parametrize("store_url", ["postgres", "sqlite"], indirect=True)
def test_cli_rejected_lists_what_was_set_aside(store: Any, store_url: str) -> None:
    from tests.test_cli import cli

    assert cli("rejected", "--store", store_url).stdout.strip() == "no rejected records"
    store.set_aside("update", "e-\x1b[31mred", None, b'{"reason": "x\\\\u0000"}',
                    "refused the record: character not in repertoire")
    shown = cli("rejected", "--store", store_url)
    assert shown.returncode == 0, shown.stderr
    assert "e-\\x1b[31mred" in shown.stdout and "\x1b" not in shown.stdout
    assert "character not in repertoire" in shown.stdout
    as_json = json.loads(cli("rejected", "--store", store_url, "--json", "--limit", "1").stdout)
    assert [r["execution_id"] for r in as_json] == ["e-\x1b[31mred"]
    assert json.loads(as_json[0]["record"]) == {"reason": "x\\u0000"}


# -- a real worker: the refused record does not wedge its pool child --------------------


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("store_url", ["postgres", "tiered"], indirect=True)
def test_nul_failure_on_a_real_worker_does_not_wedge_the_next_execution(
        store: Any, store_url: str, tmp_path: Any) -> None:
    import livingai_tasks as lai
    from livingai_tasks import ExecutionStatus, Status
    from livingai_tasks.celery_wing import runtime
    from tests.fleet import execution_status, make_fleet, wait_for

    fleet = make_fleet(tmp_path, store_url)
    try:
        from tests.agent_app import fail_with_nul, step

        fleet.worker("w1", concurrency=1)  # one pool child: both executions on it
        bad = lai.start(fail_with_nul.s(1))
        with pytest.raises(ValueError, match="bad"):
            bad.get(timeout=60, propagate=True)
        good = lai.start(step.s(5, name="after_nul"))
        assert good.get(timeout=60) is not None
        wait_for(lambda: execution_status(good.execution_id) is ExecutionStatus.COMPLETED,
                 20, "the next execution to be COMPLETED")
        wait_for(lambda: execution_status(bad.execution_id) is ExecutionStatus.FAILED,
                 20, "the failing execution to be FAILED, its reason sanitised")
        assert "\\u0000" in store.get_execution(bad.execution_id).reason
        [failed] = store.nodes(bad.execution_id)
        assert failed.status is Status.FAILED and failed.error.type == "ValueError"
        assert fleet.count("fail_with_nul") == 1
        time.sleep(2.0)  # recovery would have re-published a wedged execution by now
        assert fleet.count("after_nul") == 1
        assert "sent again with its free text escaped" in fleet.logs()
    finally:
        fleet.close()
        runtime.get().close()
