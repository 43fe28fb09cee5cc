"""A step's outcome held for the next step's entry (engine/entry.py): on a store whose entry
can carry the writes queued before it (WritesBeforeEntry), an idempotent step's SUCCESS waits
in the writer (up to writer.OUTCOME_HOLD_S) and the next step this process starts sends it
in its own store call. The logic over a MemoryStore that records its calls; a corrupted row
and a cut connection on the real Redis server (the store call itself:
test_store_conformance.py)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import redis

from livingai_tasks import (
    Execution,
    ExecutionNode,
    FencedOutError,
    NodeType,
    Status,
    StoreError,
    StoreUnavailableError,
)
from livingai_tasks.engine import CheckpointEngine
from livingai_tasks.engine import writer as writer_module
from livingai_tasks.stores.base import Fenced, Updates, WritesBeforeEntry
from livingai_tasks.stores.memory import MemoryStore
from livingai_tasks.stores.redis import RedisStore

from .conftest import REDIS_URL
from .engine_support import counter, node, wait_for
from .tcp_proxy import proxy_for

pytestmark = pytest.mark.timeout(60)


class EntryStore(MemoryStore):
    """A MemoryStore that lists its write calls: ("write", [node ids]), ("entry", node id),
    ("write+entry", [node ids], node id). `fail_entries`: that many write+entry calls raise
    StoreUnavailableError, before anything lands (or after, with `lands_anyway`: a lost
    reply)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, ...]] = []
        self.fail_entries = 0
        self.lands_anyway = False
        self._inner = False

    def write(self, nodes: Sequence[ExecutionNode], updates: Updates) -> Fenced:
        if not self._inner:
            self.calls.append(("write", [n.id for n in nodes]))
        return super().write(nodes, updates)

    def append_if_new(self, node: ExecutionNode,
                      changes: dict[str, Any]) -> ExecutionNode | None:
        if self._inner:
            return super().append_if_new(node, changes)
        self.calls.append(("entry", node.id))
        self._inner = True
        try:
            return super().append_if_new(node, changes)
        finally:
            self._inner = False

    def write_then_append_if_new(self, nodes: Sequence[ExecutionNode], updates: Updates,
                                 node: ExecutionNode, changes: dict[str, Any]
                                 ) -> tuple[Fenced, ExecutionNode | None]:
        failing = self.fail_entries > 0
        self.fail_entries -= failing
        if failing and not self.lands_anyway:
            raise StoreUnavailableError("connection refused (test)")
        self._inner = True
        try:
            answer = super().write_then_append_if_new(nodes, updates, node, changes)
        finally:
            self._inner = False
        if failing:
            raise StoreUnavailableError("connection lost before the reply (test)")
        self.calls.append(("write+entry", [n.id for n in nodes], node.id))
        return answer


@pytest.fixture
def engines(tmp_path: Any) -> Iterator[Callable[..., CheckpointEngine]]:
    made: list[CheckpointEngine] = []

    def make(store: Any) -> CheckpointEngine:
        engine = CheckpointEngine(store, spill_dir=str(tmp_path / "spill"))
        made.append(engine)
        return engine

    yield make
    for engine in made:
        engine.close(2.0)


def _hold(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """How long a held outcome waits (and the writer's window behind it)."""
    monkeypatch.setattr(writer_module, "GATHER_S", seconds)
    monkeypatch.setattr(writer_module, "OUTCOME_HOLD_S", seconds)


def _step(seq: int, execution_id: str = "e1", **kw: Any) -> ExecutionNode:
    kw.setdefault("input", {"args": [seq]})
    return node(execution_id=execution_id, seq=seq, status=Status.RUNNING,
                metadata={"fence": 0, "idempotent": kw.pop("idempotent", True),
                          "request": {"task": "tests.step"}}, **kw)


def _run(engine: CheckpointEngine, step: ExecutionNode, **kw: Any) -> ExecutionNode:
    """A step as the lifecycle records it on such a store: the entry, then the outcome
    queued without waiting."""
    assert engine.append_if_new(step, lease_owner="w1", current_node_id=step.id) is None
    done = step.evolve(status=Status.SUCCESS, output={"n": step.seq})
    engine.save(done, wait=False, **kw)
    return done


def test_a_step_s_outcome_rides_with_the_next_step_s_entry(
        engines: Callable[..., CheckpointEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing else sends the outcome (an hour's window): the next entry carries it, and the
    store has it, in one call."""
    _hold(monkeypatch, 3600.0)
    store = EntryStore()
    assert isinstance(store, WritesBeforeEntry)
    store.create_execution(Execution(id="e1"))
    engine = engines(store)
    first = _run(engine, _step(1))
    time.sleep(0.2)
    assert store.get_node(first.id).status is Status.RUNNING  # type: ignore[union-attr]
    assert engine.get_node(first.id) == first  # this process reads its own, as ever
    second = _run(engine, _step(2))
    assert store.calls == [("entry", first.id), ("write+entry", [first.id], second.id)]
    assert store.get_node(first.id) == first
    assert counter(engine, "checkpoint_batches_with_entry") == 1
    assert engine.pending == 1  # the second outcome, held in its turn
    assert engine.flush(10)  # a flush cuts the hold short
    assert store.get_node(second.id) == second


def test_a_held_outcome_goes_alone_once_the_window_ends(
        engines: Callable[..., CheckpointEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    _hold(monkeypatch, 0.2)
    monkeypatch.setattr(writer_module, "GATHER_S", 3600.0)  # the outcome's own bound ends it
    store = EntryStore()
    store.create_execution(Execution(id="e1"))
    engine = engines(store)
    first = _run(engine, _step(1))
    wait_for(lambda: store.get_node(first.id) == first, 5.0)
    assert store.calls == [("entry", first.id), ("write", [first.id])]


def test_a_tool_s_outcome_a_call_s_record_and_a_store_without_the_capability_are_never_held(
        engines: Callable[..., CheckpointEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    """A tool's outcome is the evidence its effect happened: it goes at once; so does a
    journaled call's record (no Celery request: not a step), and an idempotent step's on a
    store whose entry cannot carry it."""
    _hold(monkeypatch, 3600.0)
    store = EntryStore()
    store.create_execution(Execution(id="e1"))
    engine = engines(store)
    tool = _run(engine, _step(1, type=NodeType.TOOL, idempotent=False))
    wait_for(lambda: store.get_node(tool.id) == tool, 5.0)
    call = node(seq=2, status=Status.SUCCESS, metadata={"idempotent": True, "call_of": "x"})
    engine.save(call, wait=False)
    wait_for(lambda: store.get_node(call.id) == call, 5.0)
    plain = MemoryStore()  # no WritesBeforeEntry: its entry is a call of its own
    plain.create_execution(Execution(id="e1"))
    engine = engines(_WithoutCarry(plain))
    step = _run(engine, _step(1))
    wait_for(lambda: plain.get_node(step.id) == step, 5.0)


class _WithoutCarry:
    """A MemoryStore seen through the plain Store and AppendsIfNew methods only."""

    def __init__(self, inner: MemoryStore) -> None:
        self._inner = inner
        self.url = inner.url

    def __getattr__(self, name: str) -> Any:
        if name == "write_then_append_if_new":
            raise AttributeError(name)
        return getattr(self._inner, name)


@pytest.mark.parametrize("lands_anyway", [False, True], ids=["refused", "reply-lost"])
def test_a_failed_entry_gives_the_held_outcome_back_to_the_writer(
        engines: Callable[..., CheckpointEngine], monkeypatch: pytest.MonkeyPatch,
        lands_anyway: bool) -> None:
    """The call fails: the step's entry raises (the lifecycle reads the node back, and waits
    for the store), and the outcome it carried is the writer's again, sent once: read back
    first, since the call may have landed."""
    _hold(monkeypatch, 3600.0)
    store = EntryStore()
    store.create_execution(Execution(id="e1"))
    engine = engines(store)
    first = _run(engine, _step(1))
    store.fail_entries, store.lands_anyway = 1, lands_anyway
    second = _step(2)
    with pytest.raises(StoreUnavailableError):
        engine.append_if_new(second, lease_owner="w1")
    wait_for(lambda: store.get_node(first.id) == first, 5.0)
    assert engine.flush(10)
    assert [v.status for v in store.node_versions(first.id)] == [Status.RUNNING,
                                                                   Status.SUCCESS]
    assert (store.get_node(second.id) is not None) is lands_anyway
    assert counter(engine, "checkpoint_found_after_error") == (1 if lands_anyway else 0)
    assert counter(engine, "checkpoint_store_errors") >= 1


def test_a_fenced_out_entry_still_lands_the_outcome_it_carried(
        engines: Callable[..., CheckpointEngine], monkeypatch: pytest.MonkeyPatch) -> None:
    """The next step's execution was taken over: its entry is refused, but the previous
    step's outcome (another execution's, in force) went before it and stays written."""
    _hold(monkeypatch, 3600.0)
    store = EntryStore()
    store.create_execution(Execution(id="e1"))
    store.create_execution(Execution(id="e2"))
    engine = engines(store)
    first = _run(engine, _step(1))
    assert store.claim("e2", fence=0, owner="recovery", lease_s=0.0)  # fence 0 -> 1
    with pytest.raises(FencedOutError):
        engine.append_if_new(_step(1, execution_id="e2"), lease_owner="w1")
    assert store.get_node(first.id) == first
    assert engine.pending == 0


# -- on the real Redis server ------------------------------------------------------------


@pytest.fixture
def redis_store(redis_prefix: str) -> Iterator[RedisStore]:
    store = RedisStore(f"{REDIS_URL}?prefix={redis_prefix}")
    yield store
    store.close()


def _redis_step(store: RedisStore, execution_id: str, seq: int) -> ExecutionNode:
    store.create_execution(Execution(id=execution_id))
    return _step(seq, execution_id, input={"args": [{"state": "x" * 2000}]})


def test_redis_a_batch_failing_on_a_corrupted_row_stops_the_entry(
        redis_store: RedisStore, redis_prefix: str) -> None:
    """A corrupted execution hash (its fence not a number) fails the batch inside the
    script: the entry behind it is never made, so it can never land ahead of the writes
    queued before it."""
    first = _redis_step(redis_store, "e1", 1)
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        raw.hset(redis_store.keys.execution("e1"), "fence", "not a number")
    finally:
        raw.close()
    second = _redis_step(redis_store, "e2", 1)
    with pytest.raises(StoreError):
        redis_store.write_then_append_if_new([first], (), second, {})
    assert redis_store.get_node(second.id) is None


def test_redis_a_cut_connection_loses_no_held_outcome_and_writes_none_twice(
        redis_prefix: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real TCP cut while a step's entry carries the previous step's outcome: the entry
    fails (its step would wait for the store), and once the connection is back the writer
    lands the outcome, once."""
    _hold(monkeypatch, 3600.0)
    proxy = proxy_for(REDIS_URL)
    store = RedisStore(f"{proxy.url(REDIS_URL)}?prefix={redis_prefix}&socket_timeout=2")
    engine = CheckpointEngine(store, spill_dir=str(tmp_path / "spill"))
    try:
        first = _run(engine, _redis_step(store, "e1", 1))
        second = _redis_step(store, "e2", 1)
        proxy.cut()
        with pytest.raises(StoreUnavailableError):
            engine.append_if_new(second, lease_owner="w1")
        proxy.restore()
        assert engine.flush(20)
        assert store.node_versions(first.id) == [first]
        assert engine.append_if_new(second, lease_owner="w1") in (None, second)
        assert store.node_versions(second.id) == [second]
    finally:
        engine.close(5.0)
        store.close()
        proxy.close()
