"""WriteBehind, the write-behind queue of one process: compression off the caller's thread,
order, retries and batching, the queue bound, flush and close, fork and exit. Through a
CheckpointEngine over a store that can be made slow, failing or blocked."""

from __future__ import annotations

import importlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from livingai_tasks import (
    Codec,
    Execution,
    ExecutionNode,
    ExecutionStatus,
    NodeType,
    NotDurableError,
    Status,
    StoreUnavailableError,
    decode,
    encode,
    open_store,
)
from livingai_tasks.engine import CheckpointEngine, HotCache
from livingai_tasks.engine import writer as writer_module
from livingai_tasks.engine.queued_write import QueuedWrite
from livingai_tasks.engine.write_behind import WriteBehind
from livingai_tasks.engine.writer import coalesced
from livingai_tasks.metrics import Metrics
from livingai_tasks.stores._common import SupersedableVersions

from . import engine_support
from .engine_support import SLACK_MS, ControlledStore, counter, node, wait_for

pytestmark = pytest.mark.timeout(60)
# Fixtures shared with the other engine tests, found by pytest under these names.
cstore = engine_support.cstore
make_engine = engine_support.make_engine


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


def test_a_step_s_records_queued_within_the_gather_window_land_in_one_store_call(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step's RUNNING version, its lease and its SUCCESS, queued a little apart, are one
    store write (one transaction on SQL stores): the writer lets the data lane gather for
    GATHER_S. A widened window makes "a little apart" certain on a loaded machine."""
    monkeypatch.setattr(writer_module, "GATHER_S", 0.5)
    engine = make_engine(budget_ms=5000)
    engine.put_execution(Execution(id="e1"), durable=True)
    running = node(seq=1).evolve(status=Status.RUNNING)
    engine.save(running, wait=False)
    engine.update_execution("e1", wait=False, current_node_id=running.id, lease_owner="w1")
    time.sleep(0.05)
    engine.save(running.evolve(status=Status.SUCCESS), wait=False)
    assert engine.flush(10)
    # One call; the RUNNING version, superseded in it by the SUCCESS, is not stored.
    assert cstore.calls == [("put", "e1"), ("write", [running.id], ["e1"])]
    assert [v.status for v in cstore.inner.node_versions(running.id)] == [Status.SUCCESS]
    stored = cstore.inner.get_node(running.id)
    assert stored is not None and stored.input == running.input


def test_only_an_idempotent_step_s_running_version_is_coalesced_into_its_outcome() -> None:
    """The evidence that a tool started, a checkpoint, and a RUNNING version with no later
    version of its node in the batch are always stored; other statuses are never left out."""
    step = node(seq=1, status=Status.RUNNING, input={"args": [1]})
    tool = node(seq=2, type=NodeType.TOOL, status=Status.RUNNING)
    saved = node(seq=3, status=Status.RUNNING, checkpoint=b"state")
    retrying = node(seq=4, status=Status.RETRYING)
    batch = [step, tool, saved, retrying, step.evolve(status=Status.SUCCESS),
             tool.evolve(status=Status.SUCCESS), saved.evolve(status=Status.SUCCESS),
             retrying.evolve(status=Status.RUNNING)]
    assert coalesced(batch) == batch[1:]
    assert coalesced([step]) == [step]


def test_a_store_remembers_the_supersedable_version_it_wrote_last_per_node() -> None:
    """What a store's write() may replace (SupersedableVersions): only a RUNNING version
    coalesced() would leave out, only by a node's first version in a batch, never one the
    fence refused, and a bounded number of nodes, oldest forgotten first."""
    versions = SupersedableVersions[int](kept=2)
    step, tool = node(seq=1, status=Status.RUNNING), node(seq=2, type=NodeType.TOOL,
                                                            status=Status.RUNNING)
    versions.written(step, 1)
    versions.written(tool, 2)  # the evidence that a tool started is never superseded
    versions.written(node(seq=3, status=Status.RUNNING, checkpoint=b"state"), 3)
    assert versions.firsts([step.id, step.id, tool.id]) == [1, None, None]
    versions.written(step.evolve(status=Status.SUCCESS), 4)  # superseded: nothing to replace
    assert versions.firsts([step.id]) == [None]
    versions.written(step, None)  # refused by the fence
    assert versions.firsts([step.id]) == [None]
    others = [node(seq=10 + i, status=Status.RUNNING) for i in range(3)]
    for i, other in enumerate(others):
        versions.written(other, i)
    assert versions.firsts([n.id for n in others]) == [None, 1, 2]


def test_a_step_s_outcome_ends_the_gather_window(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a RUNNING version or a lease, which more records of their step follow, hold the
    lane: once the step's outcome is queued the writer sends at once (with an hour's
    window, nothing else would send it before the end of the test)."""
    monkeypatch.setattr(writer_module, "GATHER_S", 3600.0)
    engine = make_engine(budget_ms=5000)
    running = node(seq=1).evolve(status=Status.RUNNING)
    engine.save(running, wait=False)
    engine.update_execution("e1", wait=False, current_node_id=running.id, lease_owner="w1")
    time.sleep(0.2)
    assert cstore.calls == []  # gathering
    engine.save(running.evolve(status=Status.SUCCESS), wait=False)
    wait_for(lambda: len(cstore.calls) == 1)
    assert cstore.calls == [("write", [running.id], ["e1"])]
    # So is an update that completes (or releases) the execution: a caller's run.get() is
    # answered about then, and the record should not trail it by the window.
    engine.update_execution("e1", wait=False, status=ExecutionStatus.COMPLETED,
                            lease_deadline=None)
    wait_for(lambda: len(cstore.calls) == 2)


def test_nobody_who_waits_for_a_write_is_held_by_the_gather_window(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine],
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window only holds writes nobody waits for: a durable save, and a flush, cut it
    short (with an hour's window, either would time out otherwise)."""
    monkeypatch.setattr(writer_module, "GATHER_S", 3600.0)
    engine = make_engine(budget_ms=5000)
    engine.save(node(seq=1, status=Status.RUNNING), wait=False)  # would gather
    assert engine.save(node(seq=2), durable=True).durable  # behind the held one: both go
    assert [c[0] for c in cstore.calls] == ["write"] and len(cstore.calls[0][1]) == 2
    engine.save(node(seq=3, status=Status.RUNNING), wait=False)
    assert engine.flush(10)
    assert len(cstore.calls) == 2


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


def test_queue_full_spills_without_holding_the_agent_and_drains_in_order(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=10, queue_max=2)  # queue_full="spill", the default
    cstore.gate.clear()
    saved = [node(seq=i) for i in range(8)]
    results = [engine.save(n, f"state {n.seq}".encode()) for n in saved]
    assert [r.outcome for r in results] == ["queued"] * 2 + ["spilled"] * 6
    assert all(r.queued and not r.dropped and not r.durable for r in results)
    assert max(r.held_ms for r in results) < 10 + SLACK_MS
    assert engine.pending == 8 and engine._writes().in_memory == 2
    assert counter(engine, "checkpoint_spilled") == 6
    assert engine.metrics.gauge("checkpoint_spill_bytes") > 0
    # A spilled version is served from the cache while it waits on disk.
    assert engine.load(saved[-1].id) is not None
    cstore.gate.set()
    assert engine.flush(10)
    assert [i for _, ids, _ in cstore.calls for i in ids] == [n.id for n in saved]
    assert [decode(cstore.inner.get_node(n.id).checkpoint or b"") for n in saved] == [
        f"state {n.seq}".encode() for n in saved]
    assert counter(engine, "checkpoint_spill_drained") == 6
    assert counter(engine, "checkpoint_dropped") == 0
    assert engine.metrics.gauge("checkpoint_spill_bytes") == 0


def test_once_anything_is_spilled_later_writes_go_behind_it(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine]
) -> None:
    engine = make_engine(budget_ms=5, queue_max=4)
    cstore.gate.clear()
    first = [node(seq=i) for i in range(6)]  # 4 in memory, 2 spilled
    for n in first:
        engine.save(n)
    cstore.gate.set()
    # Room frees up in memory while 2 writes still wait on disk: a new write must not
    # overtake them, whatever the timing.
    later = [node(seq=10 + i) for i in range(6)]
    outcomes = [engine.save(n).outcome for n in later]
    assert engine.flush(10), outcomes
    assert [i for _, ids, _ in cstore.calls for i in ids] == [n.id for n in first + later]


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


def test_close_under_drop_gives_up_counts_the_loss_and_a_later_save_restarts(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine],
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = make_engine(budget_ms=1, queue_full="drop")
    cstore.down = StoreUnavailableError
    engine.save(node(seq=1))
    engine.close(0.2)
    assert engine.pending == 0
    assert counter(engine, "checkpoint_dropped") == 1
    lost = [r.getMessage() for r in caplog.records if "they are lost" in r.getMessage()]
    assert len(lost) == 1 and "StoreUnavailableError: store is down (test)" in lost[0]
    cstore.down = None
    later = node(seq=2)
    assert engine.save(later).queued
    assert engine.flush(5)
    assert cstore.calls == [("write", [later.id], [])]


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


# -- the queue on its own --------------------------------------------------------------------
def test_a_write_behind_queue_owns_its_writes_until_the_store_has_them(
    cstore: ControlledStore, tmp_path: Path,
) -> None:
    metrics = Metrics()
    cache = HotCache(max_entries=10, max_bytes=10**9, ttl_s=60)
    wb = WriteBehind(cstore, metrics, cache, codec=Codec.ZSTD, queue_max=10, queue_full="drop",
                     encode_ahead_bytes=2**20, spill_dir=str(tmp_path))
    wb.start()
    cstore.gate.clear()
    first, second = node(seq=1), node(seq=2)
    ops = [QueuedWrite("append", "e1", 100, node=n, state=b"raw") for n in (first, second)]
    assert [wb.submit(op) for op in ops] == ["queued", "queued"]
    assert [op.seq for op in ops] == [1, 2] and wb.pending == 2
    # This process reads its own queued version: raw, or compressed if the writer got to it.
    queued, state = wb.queued(second.id)
    assert queued is not None and queued.evolve(checkpoint=None) == second
    assert (state or decode(queued.checkpoint or b"")) == b"raw"
    assert cache.get(first.id) is not None  # queued versions are cached at once
    assert not wb.wait(ops[1], 0.05)
    cstore.gate.set()
    assert wb.flush(10) and wb.pending == 0
    assert wb.queued(second.id) == (None, None)
    stored = cstore.inner.get_node(second.id)
    assert stored is not None and decode(stored.checkpoint or b"") == b"raw"
    cstore.down = StoreUnavailableError
    wb.submit(QueuedWrite("append", "e1", 100, node=node(seq=3)))
    wait_for(lambda: metrics.counter("checkpoint_retries") >= 1)
    wb.close(time.monotonic() + 0.2)  # the store never took it: dropped, counted
    assert not wb.writer.is_alive() and not wb.states.thread.is_alive()
    assert metrics.counter("checkpoint_dropped") == 1 and wb.pending == 0
    assert wb.submit(QueuedWrite("append", "e1", 100, node=node(seq=4))) == "dropped"  # closed
    assert metrics.counter("checkpoint_dropped") == 2


class EncoderKilled(BaseException):
    """Not an Exception: the encoder's `except Exception` misses it."""


def test_an_encoder_killed_by_a_base_exception_is_restarted_and_loses_nothing(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine],
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    from livingai_tasks.engine import compression

    real = compression.encode_node
    killed: list[str] = []

    def encode_or_die_once(*args: object, **kwargs: object) -> ExecutionNode:
        if threading.current_thread().name == "livingai-checkpoint-encoder" and not killed:
            killed.append("encoder")
            raise EncoderKilled("killed by the test")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(compression, "encode_node", encode_or_die_once)
    engine = make_engine(budget_ms=10, unencoded_max_bytes=64 * 1024)
    cstore.gate.clear()  # the writer waits for the store: the encoder works ahead of it
    saved = [node(seq=i) for i in range(8)]
    for n in saved:
        engine.save(n, b"x" * 5000 + bytes([n.seq]))
    wb = engine._current_writes()
    assert wb is not None
    wait_for(lambda: bool(killed) and not wb.states.thread.is_alive())
    last = node(seq=99)
    engine.save(last, b"y")  # the next save starts it again
    assert wb.states.thread.is_alive()
    assert counter(engine, "checkpoint_writer_restarts") == 1
    cstore.gate.set()
    assert engine.flush(10)
    for n in saved:
        stored = cstore.inner.get_node(n.id)
        assert stored is not None
        assert decode(stored.checkpoint or b"") == b"x" * 5000 + bytes([n.seq])
    assert counter(engine, "checkpoint_dropped") == 0
    deaths = [r for r in caplog.records if "encoder thread died" in r.getMessage()]
    assert len(deaths) == 1 and "EncoderKilled" in deaths[0].getMessage()


def test_a_priority_write_waits_for_its_execution_s_spilled_writes_and_no_other(
    cstore: ControlledStore, make_engine: Callable[..., CheckpointEngine],
) -> None:
    engine = make_engine(budget_ms=5, queue_max=2)
    cstore.gate.clear()  # the writer's first call waits here
    mine = [node(execution_id="e", seq=i) for i in range(5)]
    outcomes = [engine.save(n).outcome for n in mine]
    assert outcomes.count("spilled") >= 2  # some of e's writes wait on disk
    engine.update_execution("e", priority=True, lease_deadline=2.0)
    engine.update_execution("other", priority=True, lease_deadline=1.0)
    cstore.gate.set()
    assert engine.flush(10)
    order: list[str] = []
    for _, ids, updates in cstore.calls:
        order += ids + [f"update {eid}" for eid in updates]
    # The other execution's renewal depends on nothing pending: it passes e's backlog.
    # e's own waits for every write of e queued before it, the spilled ones included.
    assert order.index("update other") < order.index(mine[-1].id)
    assert order.index("update e") > max(order.index(n.id) for n in mine)
