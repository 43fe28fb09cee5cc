"""CheckpointEngine logic over MemoryStore and a store that can be made slow or failing."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from livingai_tasks import (
    Codec,
    CodecError,
    ConfigError,
    Execution,
    ExecutionNode,
    ExecutionStatus,
    NodeType,
    NotDurableError,
    NotJSONSerializableError,
    StateTooLargeError,
    Status,
    StoreUnavailableError,
    decode,
    encode,
    open_store,
)
from livingai_tasks.engine import CheckpointEngine, HotCache
from livingai_tasks.metrics import COUNTERS, Metrics
from livingai_tasks.stores.base import Updates
from livingai_tasks.stores.memory import MemoryStore

pytestmark = pytest.mark.timeout(60)

SLACK_MS = 250.0  # timing asserts are generous: this runs on a shared 2-core machine


class ControlledStore:
    """A MemoryStore whose writes can be made slow, failing or blocked on demand.

    `calls` lists the writes that succeeded, in order: ("write", [node ids], [execution ids
    of the updates]), ("put", execution id).
    """

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.url = "memory://controlled"
        self.delay_s = 0.0
        self.down: type[Exception] | None = None  # raise this from every write
        self.reads_down = False  # and from latest_checkpoint / get_node
        self.gate = threading.Event()  # cleared: writes wait here
        self.gate.set()
        self.poison: set[str] = set()  # node ids whose append raises TypeError
        self.lose_replies = 0  # this many writes of nodes land, then raise as if the reply was lost
        self.calls: list[tuple[str, Any]] = []
        self.attempts = 0

    def release(self) -> None:
        self.down = None
        self.delay_s = 0.0
        self.gate.set()

    def _write(self) -> None:
        self.attempts += 1
        self.gate.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.down is not None:
            raise self.down("store is down (test)")

    def _read(self) -> None:
        if self.reads_down and self.down is not None:
            raise self.down("store is down (test)")

    def write(self, nodes: Sequence[ExecutionNode], updates: Updates) -> None:
        self._write()
        if any(n.id in self.poison for n in nodes):
            raise TypeError("cannot store this one (test)")
        self.inner.write(nodes, updates)
        self.calls.append(("write", [n.id for n in nodes], [eid for eid, _ in updates]))
        if self.lose_replies and nodes:
            self.lose_replies -= 1
            raise StoreUnavailableError("connection lost before the reply (test)")

    def append(self, nodes: Sequence[ExecutionNode]) -> None:
        self.write(nodes, ())

    def update_execution(self, execution_id: str, **changes: Any) -> None:
        self.write((), [(execution_id, changes)])

    def put_execution(self, execution: Execution) -> None:
        self._write()
        self.inner.put_execution(execution)
        self.calls.append(("put", execution.id))

    def create_execution(self, execution: Execution) -> bool:
        return self.inner.create_execution(execution)

    def get_node(self, node_id: str) -> ExecutionNode | None:
        self._read()
        return self.inner.get_node(node_id)

    def latest_checkpoint(self, execution_id: str) -> ExecutionNode | None:
        self._read()
        return self.inner.latest_checkpoint(execution_id)

    def node_versions(self, node_id: str) -> list[ExecutionNode]:
        return self.inner.node_versions(node_id)

    def nodes(self, execution_id: str) -> list[ExecutionNode]:
        return self.inner.nodes(execution_id)

    def get_execution(self, execution_id: str) -> Execution | None:
        return self.inner.get_execution(execution_id)

    def list_executions(self, **kw: Any) -> list[Execution]:
        return self.inner.list_executions(**kw)

    def claim(self, execution_id: str, *, fence: int, owner: str, lease_s: float) -> bool:
        return self.inner.claim(execution_id, fence=fence, owner=owner, lease_s=lease_s)

    def migrate(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def cstore() -> Iterator[ControlledStore]:
    store = ControlledStore()
    yield store
    store.release()


@pytest.fixture
def make_engine(cstore: ControlledStore) -> Iterator[Callable[..., CheckpointEngine]]:
    engines: list[CheckpointEngine] = []

    def make(store: Any = None, **kw: Any) -> CheckpointEngine:
        # These tests are about the budget: wait for the store up to it, unless told not to.
        kw.setdefault("durable_wait_ms", None)
        engine = CheckpointEngine(store if store is not None else cstore, **kw)
        engines.append(engine)
        return engine

    yield make
    cstore.release()
    for engine in engines:
        engine.close(2.0)


def node(execution_id: str = "e1", seq: int = 1, **kw: Any) -> ExecutionNode:
    return ExecutionNode(execution_id=execution_id, type=kw.pop("type", NodeType.PROMPT),
                         seq=seq, **kw)


def counter(engine: CheckpointEngine, name: str) -> float:
    return engine.metrics.counter(name)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# -- the budget ------------------------------------------------------------------------------
def test_save_within_budget_is_durable(make_engine: Callable[..., CheckpointEngine]) -> None:
    store = MemoryStore()
    engine = make_engine(store, budget_ms=5000)
    n = node(input={"goal": "book a flight"})
    result = engine.save(n, b'{"messages": []}')
    assert result.durable and result.queued and not result.dropped
    assert result.held_ms < 5000
    stored = store.get_node(n.id)
    assert stored is not None and stored.checkpoint == result.node.checkpoint
    assert decode(stored.checkpoint or b"", node_id=n.id) == b'{"messages": []}'
    assert stored.evolve(checkpoint=None) == n
    assert engine.pending == 0
    assert counter(engine, "checkpoint_budget_overruns") == 0


def test_default_wait_releases_the_caller_long_before_the_budget(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    """By default save() waits 2 ms for the store, not the whole budget: the hold does not
    follow the store's tail latency, and the write still lands."""
    engine = make_engine(budget_ms=1000, durable_wait_ms=2.0)
    cstore.delay_s = 0.3
    n = node()
    result = engine.save(n, b"state")
    assert not result.durable and result.queued
    assert result.held_ms < 250  # far below both the store's 300 ms and the 1 s budget
    assert engine.flush(10)
    assert cstore.inner.get_node(n.id) == result.node


def test_slow_store_releases_the_caller_at_the_budget(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=50)
    cstore.delay_s = 1.0
    n = node()
    result = engine.save(n, b"state")
    assert not result.durable and result.queued and not result.dropped
    assert 40 <= result.held_ms < 50 + SLACK_MS
    assert cstore.inner.get_node(n.id) is None  # the writer is still on it: not dropped
    assert engine.pending == 1
    assert engine.flush(10)
    assert cstore.inner.get_node(n.id) == result.node
    assert engine.pending == 0
    assert counter(engine, "checkpoint_budget_overruns") == 1
    assert counter(engine, "checkpoint_ops_written") == 1


def _slow_encoder(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[threading.Thread]:
    """Make the engine's encode slow; returns the threads that called it, in order."""
    # The module that compresses, for the writer, the encoder thread and the caller alike.
    module = importlib.import_module("livingai_tasks.engine.compression")
    threads: list[threading.Thread] = []
    real_encode = module.encode

    def slow_encode(state: bytes, codec: Codec = Codec.ZSTD) -> bytes:
        threads.append(threading.current_thread())
        time.sleep(seconds)
        return real_encode(state, codec)

    monkeypatch.setattr(module, "encode", slow_encode)
    return threads


def test_the_writer_encodes_so_a_slow_encode_does_not_hold_the_caller(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads = _slow_encoder(monkeypatch, 0.3)
    engine = make_engine(budget_ms=50)
    n = node()
    result = engine.save(n, b"x" * 1000)
    assert not result.durable and result.held_ms < 50 + SLACK_MS
    assert result.node.checkpoint is None  # still being encoded
    # Read back while the writer encodes: the raw state, with nothing decoded or encoded.
    loaded = engine.load(n.id)
    assert loaded is not None and loaded[1] == b"x" * 1000
    assert engine.flush(10)
    assert threads and all(t.name in ("livingai-checkpoint-writer",
                                      "livingai-checkpoint-encoder") for t in threads)
    stored = cstore.inner.get_node(n.id)
    assert stored is not None and decode(stored.checkpoint or b"") == b"x" * 1000
    assert engine.get_node(n.id) == stored  # the hot cache got the blob too
    queue = engine._current_writes()
    assert queue is not None and not queue.states.raw  # no written op is kept for the encoder
    assert (engine.metrics.percentile("checkpoint_encode_ms", 100) or 0) >= 295


def test_past_unencoded_max_bytes_the_caller_encodes_its_own_state(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    threads = _slow_encoder(monkeypatch, 0.3)
    engine = make_engine(budget_ms=300, unencoded_max_bytes=1500)
    first, second = node(seq=1), node(seq=2)
    engine.save(first, b"1" * 1000)  # the writer takes it and spends 0.3 s encoding it
    wait_for(lambda: len(threads) == 1)
    result = engine.save(second, b"2" * 1000)  # 2000 bytes would wait: encoded right here
    assert threads[1] is threading.current_thread()
    assert result.node.checkpoint is not None and decode(result.node.checkpoint) == b"2" * 1000
    # Encoding counts in the hold, and used up the budget: no further wait on top.
    assert 295 <= result.held_ms < 300 + SLACK_MS
    assert counter(engine, "checkpoint_caller_encodes") == 1
    assert engine.flush(10)
    assert [decode(cstore.inner.get_node(n.id).checkpoint or b"")  # type: ignore[union-attr]
            for n in (first, second)] == [b"1" * 1000, b"2" * 1000]


def test_the_encoder_compresses_ahead_while_the_writer_waits_for_the_store(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=50, unencoded_max_bytes=80_000)  # helps from 20_000
    cstore.gate.clear()  # the writer takes the first write and hangs in the store
    nodes = [node(seq=i) for i in range(1, 6)]
    engine.save(nodes[0], b"A" * 5000)
    wait_for(lambda: cstore.attempts == 1)  # the writer holds the first, in the store
    for i, n in enumerate(nodes[1:4], start=1):
        engine.save(n, bytes([65 + i]) * 5000)
    time.sleep(0.2)  # 15_000 bytes wait: a backlog the writer will take, left to it
    assert all(engine._queued(n.id)[1] is not None for n in nodes[1:4])
    engine.save(nodes[4], b"E" * 5000)
    # 20_000 bytes wait: the encoder thread compresses them while the writer is stuck.
    wait_for(lambda: all(engine._queued(n.id)[1] is None for n in nodes[1:]))
    assert cstore.inner.get_node(nodes[-1].id) is None  # compressed, not yet written
    cstore.gate.set()
    assert engine.flush(10)
    for i, n in enumerate(nodes):
        stored = cstore.inner.get_node(n.id)
        assert stored is not None and decode(stored.checkpoint or b"") == bytes([65 + i]) * 5000
    # Each state compressed once: the writer waited for the encoder instead of redoing it.
    assert engine.metrics.as_dict()["histograms"]["checkpoint_encode_ms"]["count"] == len(nodes)
    queue = engine._current_writes()
    assert queue is not None and not queue.states.raw


def test_a_save_waits_only_on_a_free_writer(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=5000, durable_wait_ms=300)
    cstore.gate.clear()  # the writer takes the first write and hangs in the store
    first = engine.save(node(seq=1), b"a")
    assert not first.durable and first.held_ms >= 290  # the writer was free: it waited, in vain
    # Queued behind another write, a save returns at once: writes land in order, so it
    # would seldom land within its wait, and a sleeping thread must win the GIL back.
    second = engine.save(node(seq=2), b"b")
    assert not second.durable and second.held_ms < 150
    assert counter(engine, "checkpoint_budget_overruns") == 2
    cstore.gate.set()
    assert engine.flush(10)
    third = engine.save(node(seq=3), b"c")  # a free writer again: it waits, and it lands
    assert third.durable
    assert counter(engine, "checkpoint_dropped") == 0


def test_a_save_leaves_its_queueing_to_the_holder_of_the_queue_s_lock(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=5000, durable_wait_ms=300)
    assert engine.save(node(seq=0), b"w", durable=True).durable  # the writer is running
    q = engine._current_writes()
    assert q is not None
    waiting = node(seq=1)
    held_by: list[float] = []

    def holder() -> None:  # a thread preempted while it holds the queue's lock
        with q.lock:
            held_by.append(time.monotonic())
            time.sleep(0.5)

    t = threading.Thread(target=holder)
    t.start()
    wait_for(lambda: bool(held_by))
    result = engine.save(waiting, b"a")
    assert result.held_ms < 150 and not result.durable and not result.dropped
    assert q.lock.locked() and waiting.id not in q.by_node  # not queued yet: deferred
    t.join()
    # Queued by the holder before it let go: this thread reads its own write, and it lands.
    # (The writer may have compressed it already: the version then carries its blob.)
    loaded, state = engine.load(waiting.id)
    assert state == b"a" and loaded.evolve(checkpoint=None) == waiting.evolve(checkpoint=None)
    assert engine.flush(10)
    stored = cstore.get_node(waiting.id)
    assert stored is not None and decode(stored.checkpoint or b"") == b"a"
    assert counter(engine, "checkpoint_saves") == 2 and counter(engine, "checkpoint_dropped") == 0


def test_a_durable_save_waits_for_the_queue_s_lock(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=5000)
    assert engine.save(node(seq=0), b"w", durable=True).durable
    q = engine._current_writes()
    assert q is not None
    q.lock.acquire()
    threading.Timer(0.3, q.lock.release).start()
    started = time.monotonic()
    assert engine.save(node(seq=1), b"a", durable=True).durable
    assert time.monotonic() - started >= 0.25


def test_append_if_new_is_one_store_call_and_never_races_this_process_s_queue(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=50)
    store = MemoryStore()
    direct = make_engine(store)
    store.create_execution(Execution(id="e1"))
    first = node(status=Status.RUNNING)
    assert direct.can_append_if_new(first.id)
    assert direct.append_if_new(first, lease_owner="w1") is None
    assert store.node_versions(first.id) == [first]
    assert store.get_execution("e1").lease_owner == "w1"  # type: ignore[union-attr]
    assert direct.get_node(first.id) == first  # cached as this process's latest
    assert direct.append_if_new(first.evolve(metadata={"attempt": 2})) == first
    # A version of the node still queued here is newer than anything the store could say.
    cstore.gate.clear()
    queued = node(status=Status.RUNNING)
    engine.save(queued)
    assert not engine.can_append_if_new(queued.id)
    cstore.gate.set()
    assert engine.flush(10)
    assert not hasattr(cstore, "append_if_new") and not engine.can_append_if_new("other")


def test_durable_true_waits_past_the_budget(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=10, sync_timeout_s=10)
    cstore.delay_s = 0.2
    result = engine.save(node(), b"s", durable=True)
    assert result.durable
    assert result.held_ms >= 190


def test_durable_true_raises_when_the_store_stays_down_and_the_write_lands_later(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(sync_timeout_s=0.3)
    cstore.down = StoreUnavailableError
    n = node(type=NodeType.TOOL)
    started = time.monotonic()
    with pytest.raises(NotDurableError, match=f"Node {n.id} is not durable after 0.3 s") as info:
        engine.save(n, b"before the charge", durable=True)
    assert 0.25 <= time.monotonic() - started < 0.3 + SLACK_MS / 1000
    assert "store is down" in str(info.value) and "stays queued" in str(info.value)
    assert engine.pending == 1
    assert counter(engine, "checkpoint_not_durable") == 1
    cstore.down = None
    assert engine.flush(10)
    stored = cstore.inner.get_node(n.id)
    assert stored is not None and decode(stored.checkpoint or b"") == b"before the charge"
    assert counter(engine, "checkpoint_dropped") == 0


# -- order, retries, batching ----------------------------------------------------------------
def test_order_is_kept_across_retries_and_writes_are_batched(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=5)
    cstore.down = StoreUnavailableError
    a1, a2, a3 = node(seq=1), node(seq=2), node(seq=3)
    engine.put_execution(Execution(id="e1"))
    engine.save(a1, b"s1")
    engine.save(a2.evolve(status=Status.RUNNING), b"s2")
    engine.update_execution("e1", current_node_id=a2.id, status=ExecutionStatus.IN_DOUBT)
    engine.save(a2.evolve(status=Status.SUCCESS), b"s3")
    engine.save(a3)
    wait_for(lambda: cstore.attempts >= 3)
    assert cstore.calls == []
    cstore.down = None
    assert engine.flush(10)
    # The failed head (the put) went first; what was queued meanwhile went as one write.
    assert cstore.calls == [("put", "e1"), ("write", [a1.id, a2.id, a2.id, a3.id], ["e1"])]
    assert [v.status for v in cstore.inner.node_versions(a2.id)] == [Status.RUNNING,
                                                                      Status.SUCCESS]
    execution = cstore.inner.get_execution("e1")
    assert execution is not None and execution.status is ExecutionStatus.IN_DOUBT
    latest = cstore.inner.latest_checkpoint("e1")
    assert latest is not None and decode(latest.checkpoint or b"") == b"s3"
    assert counter(engine, "checkpoint_store_errors") >= 3
    assert counter(engine, "checkpoint_retries") >= 3
    assert counter(engine, "checkpoint_batches") == 2
    assert counter(engine, "checkpoint_dropped") == 0


def test_store_down_for_a_while_then_back_loses_nothing(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=20)
    saved: dict[int, list[ExecutionNode]] = {}
    held: list[float] = []

    def agent(worker: int) -> None:
        n = node(execution_id=f"e{worker}", seq=worker)
        versions = saved[worker] = []
        for i in range(25):
            version, state = n.evolve(metadata={"i": i}), f"{worker}:{i}".encode()
            result = engine.save(version, state)
            versions.append(version.evolve(checkpoint=encode(state)))  # as the writer stores it
            held.append(result.held_ms)
            time.sleep(0.01)

    threads = [threading.Thread(target=agent, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    time.sleep(0.1)
    cstore.down = StoreUnavailableError
    time.sleep(0.5)
    cstore.down = None
    for t in threads:
        t.join()
    assert engine.flush(10)
    for versions in saved.values():
        assert cstore.inner.node_versions(versions[0].id) == versions  # all, in order
    assert max(held) < 20 + SLACK_MS
    assert counter(engine, "checkpoint_retries") >= 1
    assert counter(engine, "checkpoint_dropped") == 0
    assert counter(engine, "checkpoint_ops_written") == 100


def test_an_append_that_landed_before_its_error_is_not_written_twice(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=5)
    cstore.gate.clear()
    a, b = node(seq=1), node(seq=2)
    engine.save(a, b"a")
    # The writer takes [a] alone and waits at the gate before b and a2 are queued.
    deadline = time.monotonic() + 10
    while cstore.attempts < 1 and time.monotonic() < deadline:
        time.sleep(0.001)
    engine.save(b, b"b")
    engine.save(a.evolve(status=Status.SUCCESS), b"a2")
    cstore.lose_replies = 1
    cstore.gate.set()
    assert engine.flush(10)
    assert [v.status for v in cstore.inner.node_versions(a.id)] == [Status.PENDING,
                                                                     Status.SUCCESS]
    assert len(cstore.inner.node_versions(b.id)) == 1
    assert cstore.calls == [("write", [a.id], []), ("write", [b.id, a.id], [])]
    assert counter(engine, "checkpoint_found_after_error") == 1
    assert counter(engine, "checkpoint_ops_written") == 3


def test_batches_are_capped_at_256_nodes(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=0.01)
    cstore.down = StoreUnavailableError
    nodes = [node(seq=i) for i in range(600)]
    for n in nodes:
        engine.save(n)
    cstore.down = None
    assert engine.flush(10)
    assert [len(ids) for _, ids, _ in cstore.calls] == [256, 256, 88]
    assert [i for _, ids, _ in cstore.calls for i in ids] == [n.id for n in nodes]


def test_batches_are_capped_at_32_mib(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=1, codec=Codec.NONE)
    cstore.gate.clear()
    state = os.urandom(20 * 2**20)
    for i in range(3):
        engine.save(node(seq=i), state)
    cstore.gate.set()
    assert engine.flush(20)
    assert [len(ids) for _, ids, _ in cstore.calls] == [1, 1, 1]


def test_a_write_the_store_cannot_take_is_isolated_and_dropped_not_the_others(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=5, sync_timeout_s=10)
    cstore.down = StoreUnavailableError
    good1, bad, good2 = node(seq=1), node(seq=2), node(seq=3)
    cstore.poison = {bad.id}
    for n in (good1, bad, good2):
        engine.save(n)
    cstore.down = None
    assert engine.flush(10)
    assert cstore.inner.get_node(good1.id) is not None
    assert cstore.inner.get_node(good2.id) is not None
    assert cstore.inner.get_node(bad.id) is None
    assert counter(engine, "checkpoint_rejected") == 1
    assert counter(engine, "checkpoint_dropped") == 1
    with pytest.raises(NotDurableError, match=f"{bad.id} was rejected by the store"):
        engine.save(bad, durable=True)


# -- the queue bound -------------------------------------------------------------------------
def test_queue_full_with_drop_drops_at_once_and_counts_it(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine],
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(budget_ms=10, queue_max=3, queue_full="drop")
    cstore.gate.clear()
    kept = [node(seq=i) for i in range(3)]
    for n in kept:
        assert engine.save(n).queued
    assert engine.pending == 3
    lost = node(seq=9)
    result = engine.save(lost, b"s")
    assert result.dropped and not result.queued and not result.durable
    assert result.held_ms < SLACK_MS
    with pytest.raises(NotDurableError, match="dropped: the write-behind queue is full"):
        engine.save(node(seq=10), durable=True)
    for i in range(5):
        engine.save(node(seq=20 + i))
    assert counter(engine, "checkpoint_dropped") == 7
    drops = [r for r in caplog.records if r.getMessage().startswith("Dropped")]
    assert len(drops) == 1 and drops[0].levelname == "WARNING"  # rate-limited, not 7 lines
    assert engine.get_node(lost.id) is None  # a dropped version is not served from the cache
    cstore.gate.set()
    assert engine.flush(10)
    assert [i for _, ids, _ in cstore.calls for i in ids] == [n.id for n in kept]
    assert engine.metrics.gauge("checkpoint_queue_depth") == 0


def test_queue_full_with_block_waits_for_room_then_drops(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=10, queue_max=2, queue_full="block", queue_block_s=0.3)
    cstore.gate.clear()
    n1, n2, n3, n4 = (node(seq=i) for i in range(4))
    engine.save(n1)
    engine.save(n2)
    result = engine.save(n3)
    assert result.dropped
    assert 280 <= result.held_ms < 300 + SLACK_MS
    # Room appears while the caller waits: it gets in.
    threading.Timer(0.1, cstore.gate.set).start()
    result = engine.save(n4)
    assert result.queued and not result.dropped
    assert 80 <= result.held_ms < 300 + SLACK_MS
    assert engine.flush(10)
    assert [i for _, ids, _ in cstore.calls for i in ids] == [n1.id, n2.id, n4.id]
    assert counter(engine, "checkpoint_dropped") == 1


# -- validation in the caller's thread -------------------------------------------------------
def test_oversized_state_is_refused_before_anything_is_queued(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(max_state_bytes=1000)
    n = node()
    with pytest.raises(StateTooLargeError) as info:
        engine.save(n, b"x" * 1001)
    assert str(info.value) == (f"state of node {n.id} is 1001 bytes; the limit is 1000 "
                               "(max_state_bytes / LIVINGAI_MAX_STATE_BYTES)")
    assert isinstance(info.value, ValueError)
    engine.save(n, memoryview(b"x" * 1000))  # exactly the limit is fine
    assert engine.flush(5)
    assert cstore.attempts == 1


@pytest.mark.parametrize("state", ["text", {"messages": []}, 42])
def test_non_bytes_state_is_a_codec_error_naming_the_node(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine], state: Any
) -> None:
    engine = make_engine()
    n = node()
    with pytest.raises(CodecError, match=f"State of node {n.id} must be bytes"):
        engine.save(n, state)
    assert engine.pending == 0 and cstore.attempts == 0
    assert counter(engine, "checkpoint_saves") == 0


def test_non_json_output_is_refused_before_anything_is_queued(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine()
    n = node(output={"when": object()})
    with pytest.raises(NotJSONSerializableError, match=f"Node {n.id}"):
        engine.save(n, b"s")
    with pytest.raises(NotJSONSerializableError):
        engine.update_execution("e1", metadata={"x": {1, 2}})
    assert engine.pending == 0 and cstore.attempts == 0
    assert engine.get_node(n.id) is None  # not in the hot cache either


def test_update_execution_checks_fields_in_the_caller(
    make_engine: Callable[..., CheckpointEngine],
) -> None:
    engine = make_engine()
    with pytest.raises(ConfigError, match="cannot set \\['fence'\\]"):
        engine.update_execution("e1", fence=3)
    with pytest.raises(ConfigError, match="update_execution\\('e1'\\).*BOGUS"):
        engine.update_execution("e1", status="BOGUS")
    assert engine.pending == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget_ms": 0}, "budget_ms must be > 0, got 0"),
        ({"budget_ms": -5}, "budget_ms"),
        ({"budget_ms": float("nan")}, "budget_ms"),
        ({"budget_ms": True}, "budget_ms"),
        ({"queue_full": "wait"}, "queue_full must be 'block' or 'drop', got 'wait'"),
        ({"queue_max": 0}, "queue_max must be > 0, got 0"),
        ({"cache_entries": 1.5}, "cache_entries must be a whole number > 0, got 1.5"),
        ({"cache_bytes": 0}, "cache_bytes"),
        ({"max_state_bytes": -1}, "max_state_bytes"),
        ({"unencoded_max_bytes": 0}, "unencoded_max_bytes"),
        ({"cache_ttl_s": 0}, "cache_ttl_s"),
        ({"queue_block_s": -1}, "queue_block_s must be >= 0, got -1"),
        ({"sync_timeout_s": 0}, "sync_timeout_s"),
        ({"codec": "lz4"}, "Unknown codec 'lz4'"),
    ],
)
def test_bad_settings_are_config_errors_naming_the_accepted_range(
    kwargs: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        CheckpointEngine(MemoryStore(), **kwargs)


def test_a_non_store_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="store must implement"):
        CheckpointEngine(object())  # type: ignore[arg-type]


def test_codec_may_be_named() -> None:
    store = MemoryStore()
    engine = CheckpointEngine(store, codec="zlib")  # type: ignore[arg-type]
    result = engine.save(node(), b"s" * 100)
    assert result.node.checkpoint is not None and result.node.checkpoint[0] == Codec.ZLIB
    engine.close()


# -- the hot cache ---------------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hot_cache_evicts_least_recently_used_by_entries() -> None:
    cache = HotCache(max_entries=2, max_bytes=10**9, ttl_s=60)
    a, b, c = node(seq=1), node(seq=2), node(seq=3)
    cache.put(a, 10)
    cache.put(b, 10)
    assert cache.get(a.id) == a  # a is now the most recently used
    assert cache.put(c, 10) == 1
    assert cache.get(b.id) is None
    assert cache.get(a.id) == a and cache.get(c.id) == c
    assert cache.entries == 2


def test_hot_cache_evicts_by_bytes() -> None:
    cache = HotCache(max_entries=100, max_bytes=25_000, ttl_s=60)
    a = node(seq=1, checkpoint=b"\x00" + bytes(10_000))
    b = node(seq=2, checkpoint=b"\x00" + bytes(10_000))
    c = node(seq=3, checkpoint=b"\x00" + bytes(10_000))
    cache.put(a, 100)
    cache.put(b, 100)
    assert cache.bytes == 2 * (10_001 + 100 + HotCache.OVERHEAD)
    cache.put(c, 100)
    assert cache.get(a.id) is None and cache.get(b.id) == b and cache.get(c.id) == c
    assert cache.bytes <= 25_000
    # A version bigger than the whole cache is not held, and neither is its older version.
    huge = b.evolve(checkpoint=b"\x00" + bytes(30_000))
    cache.put(huge, 100)
    assert cache.get(b.id) is None
    assert cache.latest_checkpoint("e1") == c


def test_hot_cache_expires_by_ttl() -> None:
    clock = FakeClock()
    cache = HotCache(max_entries=10, max_bytes=10**9, ttl_s=5, clock=clock)
    a = node(checkpoint=b"\x00s")
    cache.put(a, 10)
    clock.now += 4.9
    assert cache.get(a.id) == a  # reading does not extend the TTL
    clock.now += 0.2
    assert cache.get(a.id) is None
    assert cache.latest_checkpoint("e1") is None
    assert cache.entries == 0 and cache.bytes == 0


def test_hot_cache_keeps_the_checkpoint_when_a_newer_version_has_none() -> None:
    cache = HotCache(max_entries=10, max_bytes=10**9, ttl_s=60)
    with_blob = node(checkpoint=b"\x00state")
    cache.put(with_blob, 10)
    done = with_blob.evolve(status=Status.SUCCESS, checkpoint=None)
    cache.put(done, 10)
    assert cache.get(done.id) == done
    assert cache.latest_checkpoint("e1") == with_blob


def test_engine_reads_hit_the_cache_then_the_store(
    make_engine: Callable[..., CheckpointEngine],
) -> None:
    store = MemoryStore()
    engine = make_engine(store, cache_entries=2, budget_ms=5000)
    a, b, c = node(seq=1), node(seq=2), node(seq=3)
    for n in (a, b, c):
        engine.save(n, b"s")
    assert engine.load(c.id) is not None
    assert counter(engine, "checkpoint_hot_hits") == 1
    loaded = engine.load(a.id)  # evicted: read from the store
    assert loaded is not None and loaded[1] == b"s"
    assert counter(engine, "checkpoint_cold_reads") == 1
    assert engine.get_node("missing") is None
    assert counter(engine, "checkpoint_cold_reads") == 2
    assert counter(engine, "checkpoint_cache_evictions") == 1


def test_engine_cache_ttl_and_bytes(make_engine: Callable[..., CheckpointEngine]) -> None:
    store = MemoryStore()
    engine = make_engine(store, cache_ttl_s=0.05, budget_ms=5000)
    a = node()
    engine.save(a, b"s")
    time.sleep(0.15)
    assert engine.get_node(a.id) is not None
    assert counter(engine, "checkpoint_cold_reads") == 1
    engine = make_engine(store, cache_bytes=50_000, codec=Codec.NONE, budget_ms=5000)
    b, c = node(seq=2), node(seq=3)
    engine.save(b, os.urandom(30_000))
    engine.save(c, os.urandom(30_000))
    assert engine.get_node(c.id) is not None and counter(engine, "checkpoint_hot_hits") == 1
    assert engine.get_node(b.id) is not None and counter(engine, "checkpoint_cold_reads") == 1
    assert engine.metrics.gauge("checkpoint_cache_bytes") <= 50_000  # type: ignore[operator]


def test_a_queued_version_evicted_from_the_cache_is_still_served(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(cache_entries=1, budget_ms=1)
    cstore.gate.clear()
    a, b = node(seq=1), node(seq=2)
    engine.save(a, b"a-state")
    engine.save(b, b"b-state")
    loaded = engine.load(a.id)
    assert loaded is not None and loaded[1] == b"a-state"
    assert counter(engine, "checkpoint_cold_reads") == 0


def test_latest_prefers_a_queued_newer_checkpoint(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=5000)
    old, new = node(seq=1), node(seq=2)
    engine.save(old, b"old")
    cstore.gate.clear()
    engine.save(new, b"new")  # held for the budget... then queued
    got = engine.latest("e1")
    assert got is not None and got[0].id == new.id and got[1] == b"new"
    stored = cstore.inner.latest_checkpoint("e1")
    assert stored is not None and stored.id == old.id  # the store is behind
    cstore.gate.set()
    assert engine.flush(5)
    before = counter(engine, "checkpoint_cold_reads")
    got = engine.latest("e1")
    assert got is not None and got[1] == b"new"
    assert counter(engine, "checkpoint_cold_reads") == before + 1  # durable: the store answers


def test_latest_reads_what_another_process_wrote(
    make_engine: Callable[..., CheckpointEngine],
) -> None:
    store = MemoryStore()
    engine = make_engine(store, budget_ms=5000)
    engine.save(node(seq=1), b"mine")
    other = node(seq=2).evolve(checkpoint=b"\x00theirs")
    store.append([other])
    got = engine.latest("e1")
    assert got is not None and got[0].id == other.id and got[1] == b"theirs"
    assert engine.latest("nope") is None


def test_latest_falls_back_to_the_hot_cache_when_the_store_is_down(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=5000)
    n = node()
    engine.save(n, b"cached")
    engine.save(n.evolve(status=Status.SUCCESS))  # a newer version without a blob
    cstore.down, cstore.reads_down = StoreUnavailableError, True
    got = engine.latest("e1")
    assert got is not None and got[1] == b"cached" and got[0].status is Status.PENDING
    with pytest.raises(StoreUnavailableError):
        engine.latest("other-execution")
    fresh = make_engine(budget_ms=5000)
    with pytest.raises(StoreUnavailableError):
        fresh.latest("e1")


def test_corrupt_blob_in_the_store_is_a_codec_error_naming_the_node(
    make_engine: Callable[..., CheckpointEngine],
) -> None:
    store = MemoryStore()
    engine = make_engine(store)
    bad = node(checkpoint=b"\x02\x00\x00\x00\x00not zstd")
    store.append([bad])
    with pytest.raises(CodecError, match=bad.id):
        engine.load(bad.id)
    with pytest.raises(CodecError, match=bad.id):
        engine.latest("e1")


# -- lifecycle -------------------------------------------------------------------------------
def test_flush_reports_false_while_the_store_is_down(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=1)
    assert engine.flush(0.1)  # nothing queued yet
    cstore.down = StoreUnavailableError
    engine.save(node())
    assert not engine.flush(0.2)
    assert engine.pending == 1
    cstore.down = None
    assert engine.flush(5)
    assert engine.pending == 0


def test_close_gives_up_counts_the_loss_and_a_later_save_restarts(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=1)
    cstore.down = StoreUnavailableError
    engine.save(node(seq=1))
    engine.close(0.2)
    assert engine.pending == 0
    assert counter(engine, "checkpoint_dropped") == 1
    cstore.down = None
    later = node(seq=2)
    assert engine.save(later).queued
    assert engine.flush(5)
    assert cstore.calls == [("write", [later.id], [])]


def test_create_execution_is_synchronous(make_engine: Callable[..., CheckpointEngine]) -> None:
    store = MemoryStore()
    engine = make_engine(store)
    assert engine.create_execution(Execution(id="x")) is True
    assert engine.create_execution(Execution(id="x")) is False
    assert store.get_execution("x") is not None


@pytest.mark.timeout(60)
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_the_writer_restarts_in_a_forked_child(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/fork.db"
    store = open_store(url)
    store.migrate()
    engine = CheckpointEngine(store, budget_ms=5000, durable_wait_ms=None)
    parent_node, child_node = node(seq=1), node(seq=2)
    assert engine.save(parent_node, b"from parent").durable
    parent_writer = engine._wb.writer if engine._wb is not None else None
    assert parent_writer is not None and parent_writer.is_alive()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            result = engine.save(child_node, b"from child")
            queue = engine._wb
            fresh_thread = queue is not None and queue.writer is not parent_writer
            code = 0 if engine.flush(10) and fresh_thread and result.queued else 2
        except BaseException:  # noqa: BLE001 - report through the exit code
            import traceback

            traceback.print_exc()
            code = 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    status = None
    while time.monotonic() < deadline:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = os.waitstatus_to_exitcode(raw)
            break
        time.sleep(0.05)
    if status is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung: its writer never started")
    assert status == 0
    assert engine.save(node(seq=3), b"parent again").durable  # the parent's writer still works
    fresh = open_store(url)
    stored = fresh.get_node(child_node.id)
    assert stored is not None and decode(stored.checkpoint or b"") == b"from child"
    fresh.close()
    engine.close()
    store.close()


@pytest.mark.timeout(60)
def test_a_normal_exit_flushes_queued_writes(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/exit.db"
    script = textwrap.dedent(f"""
        import time
        from livingai_tasks import ExecutionNode, NodeType, open_store
        from livingai_tasks.engine import CheckpointEngine

        store = open_store({url!r})
        store.migrate()
        real_write = store.write
        def slow_write(nodes, updates):
            time.sleep(0.3)
            real_write(nodes, updates)
        store.write = slow_write
        engine = CheckpointEngine(store, budget_ms=5)
        for i in range(5):
            n = ExecutionNode(execution_id="exit", type=NodeType.PROMPT, seq=i)
            assert not engine.save(n, b"state %d" % i).durable
        print("pending", engine.pending)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=30, check=False)
    assert out.returncode == 0, out.stderr
    assert "pending 5" in out.stdout
    fresh = open_store(url)
    assert [n.seq for n in fresh.nodes("exit")] == [0, 1, 2, 3, 4]
    fresh.close()


# -- metrics ---------------------------------------------------------------------------------
def test_metrics_show_every_series(make_engine: Callable[..., CheckpointEngine]) -> None:
    metrics = Metrics()
    engine = make_engine(budget_ms=5000, metrics=metrics)
    assert engine.metrics is metrics
    engine.save(node(seq=1), b"s")
    data = metrics.as_dict()
    assert set(COUNTERS) <= set(data["counters"])
    assert data["counters"]["checkpoint_saves"] == 1
    assert data["counters"]["checkpoint_ops_written"] == 1
    assert data["counters"]["checkpoint_batches"] == 1
    assert data["gauges"]["checkpoint_queue_depth"] == 0
    assert data["gauges"]["checkpoint_cache_entries"] == 1
    for name in ("checkpoint_held_ms", "checkpoint_encode_ms", "checkpoint_durable_ms",
                 "checkpoint_batch_ops"):
        assert data["histograms"][name]["count"] == 1, name
        assert set(data["histograms"][name]) == {"count", "sum", "max", "p50", "p95", "p99"}
    text = metrics.prometheus_text()
    for line in ("checkpoint_saves_total 1.0", "checkpoint_dropped_total 0.0",
                 "checkpoint_budget_overruns_total 0.0", "checkpoint_store_errors_total 0.0",
                 "checkpoint_retries_total", "checkpoint_hot_hits_total",
                 "checkpoint_cold_reads_total", "checkpoint_queue_depth 0.0",
                 "checkpoint_held_seconds_count 1.0", "checkpoint_durable_seconds_bucket",
                 "checkpoint_batch_ops_sum 1.0"):
        assert "\nlivingai_" + line in text, line
