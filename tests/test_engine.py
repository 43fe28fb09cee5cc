"""CheckpointEngine, the facade: the budget, validation in the caller's thread, reads of this
process's own versions, metrics. Over MemoryStore and a store that can be made slow or
failing (tests/engine_support.py); the queue itself: tests/test_write_behind.py."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import pytest

from livingai_tasks import (
    Codec,
    CodecError,
    ConfigError,
    Execution,
    NodeType,
    NotDurableError,
    NotJSONSerializableError,
    StateTooLargeError,
    Status,
    StoreUnavailableError,
    decode,
    encode,
)
from livingai_tasks.engine import CheckpointEngine
from livingai_tasks.metrics import Metrics
from livingai_tasks.metrics_catalogue import COUNTERS
from livingai_tasks.stores.memory import MemoryStore

from . import engine_support
from .engine_support import SLACK_MS, ControlledStore, counter, node

pytestmark = pytest.mark.timeout(60)
# Fixtures shared with the other engine tests, found by pytest under these names.
cstore = engine_support.cstore
make_engine = engine_support.make_engine


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
        ({"queue_full": "wait"}, "queue_full must be 'spill' or 'drop', got 'wait'"),
            ({"queue_full": "block"}, "queue_full 'block' was replaced by 'spill'"),
            ({"spill_dir": ""}, "spill_dir must be a folder path"),
        ({"queue_max": 0}, "queue_max must be > 0, got 0"),
        ({"cache_entries": 1.5}, "cache_entries must be a whole number > 0, got 1.5"),
        ({"cache_bytes": 0}, "cache_bytes"),
        ({"max_state_bytes": -1}, "max_state_bytes"),
        ({"unencoded_max_bytes": 0}, "unencoded_max_bytes"),
        ({"cache_ttl_s": 0}, "cache_ttl_s"),
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
    result = engine.save(node(), b"s" * 100, durable=True)  # as stored: compressed
    assert result.node.checkpoint is not None and result.node.checkpoint[0] == Codec.ZLIB
    engine.close()


# -- reads: this process's own versions, then the store's -------------------------------

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
    other = node(seq=2).evolve(checkpoint=encode(b"theirs", Codec.NONE))
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
def test_create_execution_is_synchronous(make_engine: Callable[..., CheckpointEngine]) -> None:
    store = MemoryStore()
    engine = make_engine(store)
    assert engine.create_execution(Execution(id="x")) is True
    assert engine.create_execution(Execution(id="x")) is False
    assert store.get_execution("x") is not None


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


def test_a_write_refused_for_its_fence_tells_its_caller_and_is_remembered(
        tmp_path: Any) -> None:
    import time as _time

    from livingai_tasks import FencedOutError, open_store
    from livingai_tasks.nodes import Meta

    store = open_store(f"sqlite:///{tmp_path}/fenced.db")
    store.migrate()
    engine = CheckpointEngine(store)
    try:
        store.create_execution(Execution(id="e1", lease_deadline=_time.time() - 1))
        assert store.claim("e1", fence=0, owner="recovery", lease_s=30)  # fence 1 now
        stale = node(seq=1).evolve(metadata={Meta.FENCE: 0})
        with pytest.raises(FencedOutError) as info:
            engine.save(stale, durable=True)
        assert info.value.node_id == stale.id and info.value.record_fence == 0
        assert engine.lost(stale.id)
        quiet = node(seq=2).evolve(metadata={Meta.FENCE: 0})
        engine.save(quiet, wait=False)
        assert engine.flush(5) and engine.lost(quiet.id)
        current = node(seq=3).evolve(metadata={Meta.FENCE: 1})
        assert engine.save(current, durable=True).durable and not engine.lost(current.id)
        assert [n.id for n in store.nodes("e1")] == [current.id]
        assert engine.metrics.as_dict()["counters"]["checkpoint_fenced_out"] == 2
    finally:
        engine.close()
        store.close()
