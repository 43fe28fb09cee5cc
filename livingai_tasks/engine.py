"""CheckpointEngine: a hot cache, a budgeted wait and a write-behind queue in front of a Store.

save() validates in the caller's thread, puts the new version in the hot cache, queues the
write for the one writer thread of this process and waits for it to become durable for at
most what is left of the budget (`budget_ms`). The state is compressed off the caller's
thread: by the writer, and once a quarter of `unencoded_max_bytes` waits, also by an
encoder thread working ahead of it (oldest first, so compression goes on while the writer
waits for the store): on a busy machine a 1 MB encode waits for a CPU for far longer than
any budget. (Past `unencoded_max_bytes` of states waiting for the writer, the caller
compresses its own: memory stays bounded and a producer faster than the writer is slowed,
never dropped.) A write that overruns the budget is not dropped (livingai 0.4.x drops it):
the caller goes on, the write stays queued, and the writer retries it, in order, until the
store has it. The queue's, the hot cache's and the metrics' locks are NoConvoyLocks: with
dozens of agent threads saving at once, none of them queues behind a waiter that was handed
a lock while it still waited for the GIL. A save that is not durable=True does not wait for
the queue's or the metrics' lock at all: if another thread holds it, that thread queues the
save and records its figures before it lets go (NoConvoyLock.defer). The only way a write
is lost is a drop, and every drop is counted (`checkpoint_dropped`):
  * the queue is full (`queue_full="drop"` at once, `"block"` after `queue_block_s`);
  * the store fails one write three times with an error that is neither a StoreError nor
    an OSError (a store bug or an unstorable record: it is sent alone first, so only that
    write goes; also counted in `checkpoint_rejected`, logged with the node id);
  * close() gives up on writes the store still has not taken after its timeout.
StoreError (StoreUnavailableError included) and OSError are retried for ever, with capped
exponential backoff (50 ms doubling to 1 s, +-20 % jitter).

Metrics (names as in `engine.metrics.as_dict()`; Prometheus adds `livingai_`, `_total` to
counters and turns `_ms` histograms into `_seconds`):
  counters    checkpoint_saves            save() calls accepted (validated)
              checkpoint_execution_writes update_execution()/put_execution() calls accepted
              checkpoint_budget_overruns  callers released before their write was durable
                                          (after durable_wait_ms, or at the budget)
              checkpoint_not_durable      durable=True calls that raised NotDurableError
              checkpoint_dropped          writes lost (see above)
              checkpoint_rejected         writes dropped because the store raised a non-StoreError
              checkpoint_store_errors     failed store calls made by the writer
              checkpoint_retries          store calls retried after a failure
              checkpoint_batches          batches written (one store call each)
              checkpoint_ops_written      writes that became durable
              checkpoint_found_after_error  appends that raised yet had landed (reply lost),
                                          found by reading back, so not written twice
              checkpoint_hot_hits         reads answered by the hot cache or the queue
              checkpoint_cold_reads       reads that went to the store
              checkpoint_cache_evictions  hot-cache entries evicted (entries, bytes or TTL)
              checkpoint_caller_encodes   saves that compressed their own state because
                                          unencoded_max_bytes of states were waiting for
                                          the writer (it is behind: raise the setting, or
                                          run fewer agents per process)
  gauges      checkpoint_queue_depth, checkpoint_cache_entries, checkpoint_cache_bytes
  histograms  checkpoint_held_ms (caller held, from call to return), checkpoint_encode_ms,
              checkpoint_durable_ms (enqueued -> the store has it), checkpoint_batch_ops
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import random
import threading
import time
import weakref
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from .codec import Codec, decode, encode
from .errors import (
    CodecError,
    ConfigError,
    LivingAIError,
    NotDurableError,
    RecordError,
    StateTooLargeError,
    StoreError,
    StoreUnavailableError,
)
from .metrics import Metrics
from .no_convoy_lock import NoConvoyLock
from .nodes import Execution, ExecutionNode, dumps_json
from .stores._common import check_execution_changes
from .stores.base import Store

__all__ = ["CheckpointEngine", "SaveResult", "WriteResult", "HotCache"]

log = logging.getLogger("livingai_tasks.engine")

_BATCH_NODES = 256
_UNENCODED_MAX_BYTES = 256 * 2**20
_BATCH_BYTES = 32 * 2**20
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 1.0  # short: once the store is back, queued writes should land promptly
_REJECT_AFTER = 3  # attempts before a write failing with a non-StoreError is dropped
_LOG_EVERY_S = 30.0
_QUEUE_FULL = ("block", "drop")
_COUNTERS = (
    "checkpoint_saves", "checkpoint_execution_writes", "checkpoint_budget_overruns",
    "checkpoint_not_durable", "checkpoint_dropped", "checkpoint_rejected",
    "checkpoint_store_errors", "checkpoint_retries", "checkpoint_batches",
    "checkpoint_ops_written", "checkpoint_found_after_error", "checkpoint_hot_hits",
    "checkpoint_cold_reads", "checkpoint_cache_evictions", "checkpoint_caller_encodes",
)
# Retried for ever: the store is down or slow. OSError too, in case a store lets a raw
# socket error through unmapped: an outage must never turn into rejected writes.
_RETRY_FOREVER = (StoreError, OSError)


@dataclass(frozen=True)
class SaveResult:
    # The version saved: as stored when durable. Otherwise its checkpoint may still be None
    # while the writer thread compresses the state; get_node() and load() serve it whole.
    node: ExecutionNode
    durable: bool  # the store had it before save() returned
    held_ms: float  # how long the caller was held, from call to return
    queued: bool  # False only if dropped
    dropped: bool  # the queue was full and the policy dropped it


@dataclass(frozen=True)
class WriteResult:
    """What update_execution() / put_execution() did; fields as in SaveResult."""

    durable: bool
    held_ms: float
    queued: bool
    dropped: bool


@dataclass(eq=False)
class _Op:
    kind: str  # "append" | "update" | "put"
    execution_id: str
    size: int
    node: ExecutionNode | None = None
    state: bytes | None = None  # raw state the writer still has to encode into node
    execution: Execution | None = None
    changes: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    enqueued: float = 0.0
    queued_behind: int = 0  # ops already queued when this one joined
    json_size: int = 0
    claimed: bool = False  # the writer or the encoder is compressing `state`


# What the encoder thread takes per round: a few states, so that it meets the agents on the
# queue's lock rarely, and leaves the rest to the writer, so that both compress.
_ENCODE_AHEAD_BYTES = 1 << 20


class _WriteQueue:
    """The FIFO and writer thread of one process. Ops leave the deque only once durable
    (or dropped), so its length is exactly what is pending and `queue_max` bounds it."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = NoConvoyLock()
        self.not_empty = self.lock.condition()
        self.not_full = self.lock.condition()
        self.done = self.lock.condition()
        self.ops: deque[_Op] = deque()
        self.next_seq = 0
        self.done_seq = 0  # every op with seq <= done_seq is durable, or rejected
        self.rejected: deque[int] = deque(maxlen=1024)
        self.solo_until = 0  # send ops one by one up to this seq (isolating a bad one)
        self.by_node: dict[str, _Op] = {}  # newest queued version of a node
        self.by_execution: dict[str, _Op] = {}  # newest queued checkpoint of an execution
        self.unencoded_bytes = 0  # raw states waiting for the writer to encode them
        self.raw: deque[_Op] = deque()  # ops that came with a raw state, oldest first
        self.raw_ready = self.lock.condition()
        self.encoded = self.lock.condition()
        self.stopping = threading.Event()
        self.dead = False
        self.last_error = ""
        self.failures = 0  # consecutive failed attempts (reset by a success)
        self.first_failure = self.last_log = 0.0
        self.head_seq = self.head_failures = 0  # non-StoreError failures of one head op
        self.unsure: list[_Op] = []  # an append that raised: it may have landed all the same
        self.thread: threading.Thread | None = None
        self.encoder: threading.Thread | None = None


@dataclass(eq=False)
class _Entry:
    latest: ExecutionNode
    latest_size: int
    checkpointed: ExecutionNode | None  # the newest version of this node carrying a blob
    checkpointed_size: int
    expires: float

    @property
    def size(self) -> int:
        extra = self.checkpointed_size if self.checkpointed is not self.latest else 0
        return self.latest_size + extra


class HotCache:
    """Per-process LRU + TTL cache of the latest version of each node, bounded by entries
    and by bytes (blob + JSON + a fixed overhead per version). It also remembers which node
    holds each execution's newest checkpoint, so latest() can answer while the store is
    down. The TTL runs from the last put, not the last read."""

    OVERHEAD = 256  # a rough per-version cost of the object itself

    def __init__(self, *, max_entries: int, max_bytes: int, ttl_s: float,
                 clock: Any = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = NoConvoyLock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._by_execution: dict[str, str] = {}
        self._bytes = 0

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(self, node: ExecutionNode, json_size: int) -> int:
        """Make `node` the cached latest version of its id; returns how many were evicted."""
        with self._lock:
            return self._put(node, json_size)

    def _put(self, node: ExecutionNode, json_size: int) -> int:
        size = json_size + len(node.checkpoint or b"") + self.OVERHEAD
        old = self._entries.pop(node.id, None)
        if old is not None:
            self._bytes -= old.size
        if node.checkpoint is not None:
            entry = _Entry(node, size, node, size, 0.0)
        elif old is not None and old.checkpointed is not None:
            entry = _Entry(node, size, old.checkpointed, old.checkpointed_size, 0.0)
        else:
            entry = _Entry(node, size, None, 0, 0.0)
        if entry.size > self.max_bytes:
            # Too big to hold; the old version went too, so it cannot be served stale.
            self._unlink(node.id, node.execution_id)
            return 1
        entry.expires = self._clock() + self.ttl_s
        self._entries[node.id] = entry
        self._bytes += entry.size
        if node.checkpoint is not None:
            self._by_execution[node.execution_id] = node.id
        evicted = 0
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            node_id, gone = self._entries.popitem(last=False)
            self._bytes -= gone.size
            self._unlink(node_id, gone.latest.execution_id)
            evicted += 1
        return evicted

    def fill(self, pending: ExecutionNode, node: ExecutionNode, json_size: int) -> int:
        """`node` is `pending` with its blob, encoded later: it replaces `pending` if that is
        still the cached latest version (a newer one must not be overwritten)."""
        with self._lock:
            entry = self._entries.get(node.id)
            if entry is None or entry.latest is not pending:
                return 0
            return self._put(node, json_size)

    def get(self, node_id: str) -> ExecutionNode | None:
        with self._lock:
            entry = self._live(node_id)
            return None if entry is None else entry.latest

    def latest_checkpoint(self, execution_id: str) -> ExecutionNode | None:
        with self._lock:
            node_id = self._by_execution.get(execution_id)
            entry = None if node_id is None else self._live(node_id)
            return None if entry is None else entry.checkpointed

    def reset_after_fork(self) -> None:
        self._lock = NoConvoyLock()
        self._entries.clear()
        self._by_execution.clear()
        self._bytes = 0

    def _live(self, node_id: str) -> _Entry | None:
        entry = self._entries.get(node_id)
        if entry is None:
            return None
        if self._clock() >= entry.expires:
            del self._entries[node_id]
            self._bytes -= entry.size
            self._unlink(node_id, entry.latest.execution_id)
            return None
        self._entries.move_to_end(node_id)
        return entry

    def _unlink(self, node_id: str, execution_id: str) -> None:
        if self._by_execution.get(execution_id) == node_id:
            del self._by_execution[execution_id]


_engines: weakref.WeakSet[CheckpointEngine] = weakref.WeakSet()


class CheckpointEngine:
    """Budgeted, ordered, write-behind checkpointing of ExecutionNodes into a Store.

    Thread-safe. One writer thread (and its encoder thread) per process, started on the
    first write and again in a forked child (the parent's queue stays the parent's). An
    atexit hook flushes for up to 5 s on a normal interpreter exit; call close() in a
    worker's shutdown hook to be sure.
    The engine never closes the store: its owner does.
    """

    def __init__(
        self,
        store: Store,
        *,
        budget_ms: float = 50.0,
        codec: Codec = Codec.ZSTD,
        cache_entries: int = 1024,
        cache_bytes: int = 256 * 2**20,
        cache_ttl_s: float = 3600.0,
        queue_max: int = 10_000,
        queue_full: str = "block",
        queue_block_s: float = 1.0,
        max_state_bytes: int = 64 * 2**20,
        sync_timeout_s: float = 10.0,
        durable_wait_ms: float | None = 2.0,
        unencoded_max_bytes: int = _UNENCODED_MAX_BYTES,
        metrics: Metrics | None = None,
    ) -> None:
        if not isinstance(store, Store):
            raise ConfigError(f"store must implement livingai_tasks.Store (append, get_node, "
                              f"..., url), got {type(store).__name__}.")
        _check_number("budget_ms", budget_ms, low=0.0)
        _check_number("cache_ttl_s", cache_ttl_s, low=0.0)
        _check_number("queue_block_s", queue_block_s, low=0.0, inclusive=True)
        _check_number("sync_timeout_s", sync_timeout_s, low=0.0)
        if durable_wait_ms is not None:
            _check_number("durable_wait_ms", durable_wait_ms, low=0.0, inclusive=True)
        for name, value in (("cache_entries", cache_entries), ("cache_bytes", cache_bytes),
                            ("queue_max", queue_max), ("max_state_bytes", max_state_bytes),
                            ("unencoded_max_bytes", unencoded_max_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}.")
        if queue_full not in _QUEUE_FULL:
            raise ConfigError(f"queue_full must be 'block' or 'drop', got {queue_full!r}.")
        try:
            self._codec = Codec.parse(codec)
        except CodecError as exc:
            raise ConfigError(str(exc)) from None
        self.store = store
        self.metrics = metrics if metrics is not None else Metrics()
        self._budget_s = budget_ms / 1000.0
        # How long save() waits for the store before leaving the write to the writer: the
        # agent's hold is then encode + this, not the store's tail latency (a PostgreSQL
        # commit's p99 is tens of ms on a shared disk). None: wait up to the whole budget.
        self._durable_wait_s = (self._budget_s if durable_wait_ms is None
                                else min(durable_wait_ms / 1000.0, self._budget_s))
        self._queue_max = queue_max
        self._queue_full = queue_full
        self._queue_block_s = queue_block_s
        self._max_state_bytes = max_state_bytes
        self._unencoded_max_bytes = unencoded_max_bytes
        # The encoder thread joins in once this much waits: a writer that keeps up compresses
        # alone, and a burst of small states does not meet one more thread on the lock.
        self._encode_ahead_bytes = unencoded_max_bytes // 4
        self._sync_timeout_s = sync_timeout_s
        self._cache = HotCache(max_entries=cache_entries, max_bytes=cache_bytes, ttl_s=cache_ttl_s)
        self._q: _WriteQueue | None = None
        self._q_lock = threading.Lock()
        self._drop_log_lock = threading.Lock()
        self._drop_logged_at = 0.0
        self._drops_unlogged = 0
        for name in _COUNTERS:  # zero from the start, so rate() and alerts see the series
            self.metrics.incr(name, 0)
        # Read when the metrics are read, not set on every save: fewer lock round trips on
        # the hot path, where 50 agent threads would queue behind the metrics' lock.
        me = weakref.ref(self)
        for name, read in _GAUGES.items():
            self.metrics.gauge_from(name, _gauge(me, read))
        _engines.add(self)

    # -- writes ---------------------------------------------------------------------------
    def save(
        self, node: ExecutionNode, state: bytes | None = None, *, durable: bool = False,
        wait: bool = True,
    ) -> SaveResult:
        """Record a new version of `node`, with `state` (raw bytes) encoded as its checkpoint.

        Returns once the store has it, or after waiting `durable_wait_ms` for it (2 ms by
        default; None: up to the budget), and never later than `budget_ms` after the call;
        at once if other writes are queued ahead of it (the writer is busy) or another thread
        holds the queue's lock (that thread queues this write before it lets go). An unfinished
        write stays queued and the writer retries it. The writer thread
        encodes the state, unless `unencoded_max_bytes` of states already wait for it.
        With `state=None` the node's own `checkpoint` field is saved as given.
        `durable=True` waits up to `sync_timeout_s` instead, else raises NotDurableError
        (the write stays queued); `wait=False` queues it and returns without waiting.
        Raises, before anything is queued: CodecError (state not bytes), StateTooLargeError,
        NotJSONSerializableError (input/output/metadata), RecordError (not a node).
        """
        start = time.perf_counter()
        if not isinstance(node, ExecutionNode):
            raise RecordError(f"save() takes an ExecutionNode, got {type(node).__name__}.")
        if state is not None:
            if not isinstance(state, (bytes, bytearray, memoryview)):
                raise CodecError(
                    f"State of node {node.id} must be bytes, got {type(state).__name__}. "
                    "Encode it first, e.g. json.dumps(state).encode()."
                )
            size = memoryview(state).nbytes
            if size > self._max_state_bytes:
                raise StateTooLargeError(
                    f"state of node {node.id} is {size} bytes; the limit is "
                    f"{self._max_state_bytes} (max_state_bytes / LIVINGAI_MAX_STATE_BYTES)"
                )
        json_size = len(node.to_json())
        raw: bytes | None = None
        if state is not None:
            raw = bytes(state)  # a copy of a bytearray: the caller may reuse its buffer
            q = self._current_queue()
            if q is not None and q.unencoded_bytes + len(raw) > self._unencoded_max_bytes:
                node, raw = self._encoded(node, raw), None  # the writer is behind: help it
                self.metrics.incr("checkpoint_caller_encodes")
            else:
                node = node.evolve(checkpoint=None)
        blob_size = len(node.checkpoint) if node.checkpoint is not None else len(raw or b"")
        op = _Op("append", node.execution_id, json_size + blob_size, node=node, state=raw)
        op.json_size = json_size
        ok, queued = self._submit_and_wait(op, start, durable, f"Node {node.id}", wait,
                                           "checkpoint_saves")
        return SaveResult(cast(ExecutionNode, op.node), ok, _ms_since(start), queued,
                          not queued)

    def update_execution(
        self, execution_id: str, *, durable: bool = False, wait: bool = True, **changes: Any
    ) -> WriteResult:
        """Queue a change of an execution's summary (fields: stores.EXECUTION_FIELDS);
        same budget, ordering and durable=True semantics as save(). `updated_at` is the
        time of this call unless given. ConfigError for an unknown field or bad status."""
        start = time.perf_counter()
        try:
            changes = check_execution_changes(changes)
        except LivingAIError:
            raise
        except ValueError as exc:
            raise ConfigError(f"update_execution({execution_id!r}): {exc}") from None
        size = len(dumps_json(changes.get("metadata"), what=f"Execution {execution_id} metadata"))
        op = _Op("update", execution_id, size + 256, changes=changes)
        ok, queued = self._submit_and_wait(op, start, durable, f"Execution {execution_id}",
                                           wait, "checkpoint_execution_writes")
        return WriteResult(ok, _ms_since(start), queued, not queued)

    def can_append_if_new(self, node_id: str) -> bool:
        """Whether append_if_new() may be used for this node: the store offers it and this
        process has no version of the node still queued (the store's answer would miss it)."""
        return hasattr(self.store, "append_if_new") and self._queued(node_id)[0] is None

    def append_if_new(self, node: ExecutionNode, **execution_changes: Any) -> ExecutionNode | None:
        """A step's entry check and its first record in one synchronous store call (stores
        with `append_if_new`: Redis): if the store has no version of `node`, write it and the
        changes of its execution and return None; else write nothing and return the store's
        latest version. Not queued and not budgeted: a store error propagates, and the
        write may then have landed or not (read the node back to know)."""
        changes = check_execution_changes(execution_changes) if execution_changes else {}
        existing: ExecutionNode | None = cast(Any, self.store).append_if_new(node, changes)
        if existing is None:
            self.metrics.incr("checkpoint_saves")
            self.metrics.incr("checkpoint_ops_written")
            self._note_evictions(self._cache.put(node, len(node.to_json())))
        return existing

    def put_execution(self, execution: Execution, *, durable: bool = False) -> WriteResult:
        """Queue an insert-or-replace of an execution; semantics as update_execution()."""
        start = time.perf_counter()
        op = _Op("put", execution.id, len(execution.to_json()), execution=execution)
        ok, queued = self._submit_and_wait(op, start, durable, f"Execution {execution.id}",
                                           True, "checkpoint_execution_writes")
        return WriteResult(ok, _ms_since(start), queued, not queued)

    def create_execution(self, execution: Execution) -> bool:
        """Insert the execution if absent, synchronously (the caller needs the answer):
        True if inserted. Not queued, so not ordered after queued writes. Store errors
        propagate."""
        return self.store.create_execution(execution)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every write queued so far (in this process) is durable or dropped.
        True if none is left pending, False after `timeout_s` seconds."""
        q = self._current_queue()
        if q is None:
            return True
        with q.lock:
            target = q.next_seq
        return self._wait(q, target, timeout_s, strict=False)

    @property
    def pending(self) -> int:
        """Writes queued in this process and not yet durable."""
        q = self._current_queue()
        return 0 if q is None else len(q.ops)

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush for up to `timeout_s` seconds, then stop the writer. Writes still pending
        are dropped (counted, logged). A later write starts a new writer."""
        deadline = time.monotonic() + timeout_s
        q = self._current_queue()
        if q is None:
            return
        self.flush(timeout_s)
        with self._q_lock:
            if self._q is q:
                self._q = None
        with q.lock:
            q.stopping.set()
            q.not_empty.notify_all()
            q.raw_ready.notify_all()
        for thread in (q.thread, q.encoder):
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(deadline - time.monotonic(), 0.1))
        with q.lock:
            lost = len(q.ops)
            q.ops.clear()
            q.by_node.clear()
            q.by_execution.clear()
            q.raw.clear()
            q.unencoded_bytes = 0
            q.dead = True
            q.done.notify_all()
            q.not_full.notify_all()
        if lost:
            self.metrics.incr("checkpoint_dropped", lost)
            log.error("Checkpoint engine closed with %d writes the store %s never took "
                      "(last error: %s); they are lost.", lost, self.store.url, q.last_error)

    # -- reads ----------------------------------------------------------------------------
    def get_node(self, node_id: str) -> ExecutionNode | None:
        """Latest version of a node (blob included): this process's own newest version
        from the hot cache or the queue, else the store's. Store errors propagate."""
        node, state = self._queued(node_id)
        if node is not None and state is not None:
            self.metrics.incr("checkpoint_hot_hits")
            return self._encoded(node, state)  # not encoded by the writer yet: here, then
        node = node or self._cache.get(node_id)
        if node is not None:
            self.metrics.incr("checkpoint_hot_hits")
            return node
        # Cold reads are not cached: a read racing a newer queued save could pin an old version.
        self.metrics.incr("checkpoint_cold_reads")
        return self.store.get_node(node_id)

    def load(self, node_id: str) -> tuple[ExecutionNode, bytes | None] | None:
        """get_node() plus its decoded state (None if it has no checkpoint). CodecError,
        naming the node, if the blob is corrupt."""
        node, state = self._queued(node_id)
        if node is not None and state is not None:
            self.metrics.incr("checkpoint_hot_hits")
            return node, state
        node = self.get_node(node_id)
        return None if node is None else (node, _decoded(node))

    def latest(self, execution_id: str) -> tuple[ExecutionNode, bytes | None] | None:
        """The execution's latest checkpoint-bearing node and its decoded state.

        A checkpoint this process has queued but not yet written wins; otherwise the store
        answers (another process may have written a newer one). If the store is
        unreachable, the hot cache answers; if it has nothing, StoreUnavailableError.
        """
        q = self._current_queue()
        node: ExecutionNode | None = None
        state: bytes | None = None
        if q is not None:
            with q.lock:
                op = q.by_execution.get(execution_id)
                if op is not None:
                    node, state = op.node, op.state
        if node is not None:
            self.metrics.incr("checkpoint_hot_hits")
            if state is not None:
                return node, state
        else:
            try:
                self.metrics.incr("checkpoint_cold_reads")
                node = self.store.latest_checkpoint(execution_id)
            except StoreUnavailableError as exc:
                node = self._cache.latest_checkpoint(execution_id)
                if node is None:
                    raise
                self.metrics.incr("checkpoint_hot_hits")
                log.warning("Store %s unreachable (%s); serving execution %s's checkpoint "
                            "from the hot cache", self.store.url, exc, execution_id)
        return None if node is None else (node, _decoded(node))

    def _queued(self, node_id: str) -> tuple[ExecutionNode | None, bytes | None]:
        """This process's newest queued version of a node, and its state if still raw."""
        q = self._current_queue()
        if q is None:
            return None, None
        with q.lock:
            op = q.by_node.get(node_id)
            return (op.node, op.state) if op is not None else (None, None)

    def _encoded(self, node: ExecutionNode, state: bytes) -> ExecutionNode:
        start = time.perf_counter()
        encoded = node.evolve(checkpoint=encode(state, self._codec))
        self.metrics.observe("checkpoint_encode_ms", (time.perf_counter() - start) * 1000.0)
        return encoded

    # -- queue ----------------------------------------------------------------------------
    def _submit_and_wait(
        self, op: _Op, start: float, durable: bool, what: str, wait: bool, count: str
    ) -> tuple[bool, bool]:
        """Queue `op` and wait; (durable, queued). Raises NotDurableError for durable=True.
        wait=False (bookkeeping whose loss the lease covers): queue it and return. `count`:
        the counter of accepted calls of this kind."""
        q = self._queue()
        # Only a durable write needs its place in the queue before it returns: others may
        # leave queueing to the thread holding the queue's lock.
        seq = self._submit(q, op, wait_for_lock=durable)
        if seq is None:
            if durable:
                self._held(start, count, "checkpoint_not_durable")
                raise NotDurableError(f"{what} was dropped: the write-behind queue is full "
                                      f"({self._queue_max} writes; store {self.store.url} "
                                      f"is slow or down: {q.last_error or 'no error yet'}).")
            self._held(start, count)
            return False, False
        if not wait and not durable:
            self._held(start, count)
            return False, True
        if seq == 0:  # deferred to the thread holding the queue's lock: not waited for
            self._held(start, count, "checkpoint_budget_overruns")
            return False, True
        if durable:
            timeout = self._sync_timeout_s
        else:
            # Stop a little early: a thread woken at the deadline returns late, and the
            # budget is a promise about the hold, wake-up included.
            spent = time.perf_counter() - start
            timeout = min(self._durable_wait_s, self._budget_s - _WAKE_MARGIN_S - spent)
            if op.queued_behind:
                # The writer is busy with older writes, which land first: this one would
                # seldom make it within the wait. And a thread that sleeps must win the GIL
                # back to return: when many threads are busy (a burst of saves) that takes
                # tens of ms, which is the whole tail of the hold. So wait only on a free
                # writer.
                timeout = 0.0
        if self._wait(q, seq, timeout):
            self._held(start, count)
            return True, True
        if not durable:
            self._held(start, count, "checkpoint_budget_overruns")
            return False, True
        self._held(start, count, "checkpoint_not_durable")
        if seq in q.rejected:
            raise NotDurableError(f"{what} was rejected by the store {self.store.url} "
                                  f"({q.last_error}) and dropped; see the error log.")
        raise NotDurableError(
            f"{what} is not durable after {self._sync_timeout_s:g} s (store "
            f"{self.store.url}: {q.last_error or 'slow'}); the write stays queued and "
            "lands when the store answers."
        )

    def _held(self, start: float, *counters: str) -> None:
        # One acquisition of the metrics' lock per call: with many threads saving, each
        # acquisition is a place to queue behind a thread that waits for the GIL.
        self.metrics.observe("checkpoint_held_ms", _ms_since(start), count=counters)

    def _submit(self, q: _WriteQueue, op: _Op, *, wait_for_lock: bool = True) -> int | None:
        """Queue `op`: its seq, or None if dropped (queue full, engine closed). With
        wait_for_lock=False, 0 if the queue's lock was held: the thread holding it queues
        `op` before it lets go, and this one returns at once."""
        if not wait_for_lock and len(q.ops) < self._queue_max and not q.dead:
            # A thread preempted while it holds the lock would hold up every saver that waits
            # for it, for as long as it takes to win the GIL back (tens of ms with 50 busy
            # threads). Read without the lock, the length may be stale: the queue can then
            # exceed queue_max by the saves deferred meanwhile.
            q.lock.defer(lambda: self._enqueue_deferred(q, op))
            return op.seq
        with q.lock:
            if len(q.ops) >= self._queue_max and self._queue_full == "block":
                deadline = time.monotonic() + self._queue_block_s
                while len(q.ops) >= self._queue_max and not q.dead:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    q.not_full.wait(remaining)
            depth = len(q.ops)
            if depth >= self._queue_max or q.dead:
                seq = None
            else:
                self._enqueue(q, op)
                seq = op.seq
        if seq is None:
            self._note_drop(op, depth, q.last_error)
        return seq

    def _enqueue_deferred(self, q: _WriteQueue, op: _Op) -> None:
        if q.dead:  # closed since: its pending writes were dropped, and so is this one
            self._note_drop(op, len(q.ops), q.last_error)
        else:
            self._enqueue(q, op)

    def _enqueue(self, q: _WriteQueue, op: _Op) -> None:
        """Put `op` on the queue; called with the queue's lock held."""
        op.enqueued = time.perf_counter()
        op.queued_behind = len(q.ops)
        q.ops.append(op)
        evicted = 0
        if op.node is not None:
            # Under the queue lock, so the cache and the queue agree on which of two
            # racing versions is the newer; a dropped version is never cached.
            evicted = self._cache.put(op.node, op.json_size)
            q.by_node[op.node.id] = op
            if op.node.checkpoint is not None or op.state is not None:
                q.by_execution[op.execution_id] = op
            if op.state is not None:
                q.unencoded_bytes += len(op.state)
                q.raw.append(op)
                if q.unencoded_bytes >= self._encode_ahead_bytes:
                    q.raw_ready.notify()
        q.not_empty.notify()
        q.next_seq += 1
        op.seq = q.next_seq  # last: a deferring thread that reads it finds `op` queued
        self._note_evictions(evicted)

    def _note_drop(self, op: _Op, depth: int, last_error: str) -> None:
        self.metrics.incr("checkpoint_dropped")
        # One warning per interval, with the count: an outage with a full queue must not
        # turn every save into a log line.
        with self._drop_log_lock:
            self._drops_unlogged += 1
            now = time.monotonic()
            if now - self._drop_logged_at < _LOG_EVERY_S and self._drop_logged_at:
                return
            count, self._drops_unlogged, self._drop_logged_at = self._drops_unlogged, 0, now
        what = f"node {op.node.id}" if op.node is not None else f"{op.kind} of execution"
        log.warning("Dropped %d write(s), the latest of %s %s: the write-behind queue is full "
                    "(%d writes, policy %r); store %s: %s", count, what, op.execution_id,
                    depth, self._queue_full, self.store.url, last_error or "slow")

    def _wait(self, q: _WriteQueue, seq: int, timeout_s: float, *, strict: bool = True) -> bool:
        if timeout_s <= 0:
            # No lock: under contention every acquisition is a place to queue behind a
            # thread that holds the lock while it waits for the GIL. Reads of an int and
            # of a deque are atomic; a stale answer only says "not yet".
            return q.done_seq >= seq and not (strict and seq in q.rejected)
        deadline = time.monotonic() + max(timeout_s, 0.0)
        with q.lock:
            while q.done_seq < seq and not q.dead:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                q.done.wait(remaining)
            if q.done_seq < seq:
                return False
            return not (strict and seq in q.rejected)

    def _queue(self) -> _WriteQueue:
        """This process's queue, with its writer running; a new one after fork or close."""
        q = self._q
        if q is not None and q.pid == os.getpid():
            return q
        with self._q_lock:
            q = self._q
            if q is None or q.pid != os.getpid():
                q = _WriteQueue()
                q.thread = threading.Thread(target=self._write_loop, args=(q,),
                                            name="livingai-checkpoint-writer", daemon=True)
                q.encoder = threading.Thread(target=self._encode_loop, args=(q,),
                                             name="livingai-checkpoint-encoder", daemon=True)
                q.thread.start()
                q.encoder.start()
                self._q = q
            return q

    def _current_queue(self) -> _WriteQueue | None:
        q = self._q
        return q if q is not None and q.pid == os.getpid() else None

    def _after_fork_in_child(self) -> None:
        # The parent's threads do not exist here and its locks may be held by them: start
        # clean. The cache goes too: its versions may never become durable in the parent.
        self._q = None
        self._q_lock = threading.Lock()
        self._drop_log_lock = threading.Lock()
        self._cache.reset_after_fork()

    def _note_evictions(self, evicted: int) -> None:
        if evicted:
            self.metrics.incr("checkpoint_cache_evictions", evicted)

    # -- the writer thread ----------------------------------------------------------------
    def _write_loop(self, q: _WriteQueue) -> None:
        while True:
            with q.lock:
                while not q.ops and not q.stopping.is_set():
                    q.not_empty.wait()
                if q.stopping.is_set():
                    return
                # Re-formed on every attempt: after an outage, the retry of the failed head
                # carries everything queued meanwhile in one call. The head never changes
                # until it is written (or rejected), so order is kept.
                batch = self._next_batch(q)
            try:
                backoff = self._attempt(q, batch)
            except Exception:  # noqa: BLE001 - the writer must outlive any bug below it
                log.exception("Checkpoint writer: unexpected error; continuing")
                backoff = _BACKOFF_MAX_S
            if backoff and q.stopping.wait(backoff * random.uniform(0.8, 1.2)):
                return

    def _next_batch(self, q: _WriteQueue) -> list[_Op]:
        """Consecutive appends and updates (capped), written as one store.write(), or one
        put; called with the lock held. A step queues its RUNNING version and its lease
        back to back: they land in one round trip."""
        head = q.ops[0]
        batch = [head]
        if head.kind == "put" or head.seq <= q.solo_until:
            return batch
        size = head.size
        for op in q.ops:
            if op is head:
                continue
            if op.kind == "put" or len(batch) >= _BATCH_NODES or size + op.size > _BATCH_BYTES:
                break
            batch.append(op)
            size += op.size
        return batch

    def _attempt(self, q: _WriteQueue, batch: list[_Op]) -> float:
        """One try at writing `batch`; returns how long to back off before the next (s)."""
        try:
            if q.unsure and q.unsure[0] is batch[0] and self._landed(q.unsure):
                # The failed attempt did reach the store (its reply was lost): resending
                # would append every version of it a second time.
                self.metrics.incr("checkpoint_found_after_error", len(q.unsure))
                batch, q.unsure = q.unsure, []
            else:
                q.unsure = []
                self._encode_batch(q, batch)
                self._apply(batch)
        except Exception as exc:
            if any(op.kind == "append" for op in batch) and not q.unsure:
                q.unsure = batch
            now = time.monotonic()
            q.failures += 1
            q.last_error = f"{type(exc).__name__}: {exc}"
            self.metrics.incr("checkpoint_store_errors")
            if q.failures == 1:
                q.first_failure = q.last_log = now
                log.warning("Store %s failed a write (%s); %d writes queued, retrying",
                            self.store.url, q.last_error, len(q.ops))
            elif now - q.last_log >= _LOG_EVERY_S:
                q.last_log = now
                log.warning("Store %s still failing after %.0f s and %d attempts (%s); "
                            "%d writes queued", self.store.url, now - q.first_failure,
                            q.failures, q.last_error, len(q.ops))
            # Connection trouble is retried for ever. Anything else may be one bad record
            # (or a store bug): isolate it, then drop it after a few tries rather than
            # wedge every later write behind it.
            if not isinstance(exc, _RETRY_FOREVER):
                if len(batch) > 1:
                    with q.lock:
                        q.solo_until = batch[-1].seq
                    return 0.0
                q.head_failures = q.head_failures + 1 if q.head_seq == batch[0].seq else 1
                q.head_seq = batch[0].seq
                if q.head_failures >= _REJECT_AFTER:
                    self._reject(q, batch[0], exc)
                    return 0.0
            self.metrics.incr("checkpoint_retries")
            return min(_BACKOFF_FIRST_S * 2.0 ** (q.failures - 1), _BACKOFF_MAX_S)
        if q.failures:
            log.info("Store %s took writes again after %d failed attempts (%.1f s)",
                     self.store.url, q.failures, time.monotonic() - q.first_failure)
            q.failures = 0
        self._done(q, batch)
        return 0.0

    def _encode_batch(self, q: _WriteQueue, batch: list[_Op]) -> None:
        """Compress the states of `batch` still raw: here those the encoder thread has not
        taken, then wait for those it has. zstd and zlib release the GIL while they work,
        so the agents' threads run meanwhile."""
        while True:
            with q.lock:
                mine = [op for op in batch if op.state is not None and not op.claimed]
                for op in mine:
                    op.claimed = True
                if not mine:
                    theirs = [op for op in batch if op.state is not None]  # all claimed
                    if not theirs:
                        return
                    if q.encoder is None or not q.encoder.is_alive():
                        for op in theirs:  # nobody is left to finish them
                            op.claimed = False
                    else:
                        q.encoded.wait(0.5)
                    continue
            done: list[tuple[_Op, ExecutionNode, ExecutionNode]] = []
            try:
                for op in mine:
                    pending = cast(ExecutionNode, op.node)
                    done.append((op, pending, self._encoded(pending, cast(bytes, op.state))))
            except BaseException:
                with q.lock:
                    for op in mine:
                        op.claimed = False
                raise
            evicted = 0
            with q.lock:  # once per batch: agents' saves queue on this lock
                for op, pending, encoded in done:
                    evicted += self._swap_encoded(q, op, pending, encoded)
            self._note_evictions(evicted)

    def _encode_loop(self, q: _WriteQueue) -> None:
        """The encoder thread: compresses queued states ahead of the writer, oldest first,
        so that compression goes on while the writer waits for the store, and a backlog
        gets a second core."""
        while True:
            with q.lock:
                ops = self._claim_raw(q, self._encode_ahead_bytes)
                while not ops and not q.stopping.is_set():
                    q.raw_ready.wait()
                    ops = self._claim_raw(q, self._encode_ahead_bytes)
                if not ops:
                    return
                jobs = [(op, cast(ExecutionNode, op.node), cast(bytes, op.state)) for op in ops]
            done: list[tuple[_Op, ExecutionNode, ExecutionNode]] = []
            for op, pending, state in jobs:
                try:
                    done.append((op, pending, self._encoded(pending, state)))
                except Exception:  # noqa: BLE001 - the writer meets the same error, handles it
                    log.exception("Checkpoint encoder: could not compress node %s; the writer "
                                  "will retry it", pending.id)
            evicted = 0
            with q.lock:  # once per round, like the writer: agents' saves queue on this lock
                for op, pending, encoded in done:
                    evicted += self._swap_encoded(q, op, pending, encoded)
                for op, _, _ in jobs:
                    op.claimed = False  # done, or failed: then the writer takes it
                q.encoded.notify_all()
            self._note_evictions(evicted)

    @staticmethod
    def _claim_raw(q: _WriteQueue, backlog: int) -> list[_Op]:
        """While at least `backlog` bytes of states wait: the oldest ops whose states nobody
        is compressing yet, up to _ENCODE_AHEAD_BYTES (at least one), claimed; lock held.
        Taken a few at a time, so that the encoder meets the agents on the lock rarely."""
        ops: list[_Op] = []
        size = 0
        if q.unencoded_bytes < backlog:
            return ops
        while q.raw and (not ops or size + len(q.raw[0].state or b"") <= _ENCODE_AHEAD_BYTES):
            op = q.raw.popleft()
            if op.state is not None and not op.claimed:
                op.claimed = True
                ops.append(op)
                size += len(op.state)
        return ops

    def _swap_encoded(self, q: _WriteQueue, op: _Op, pending: ExecutionNode,
                      encoded: ExecutionNode) -> int:
        """Put the compressed version in place of the raw state; lock held. Returns the
        cache evictions."""
        if op.state is None or q.dead:  # written off meanwhile (rejected, or closed)
            return 0
        q.unencoded_bytes -= len(op.state)
        op.node, op.state = encoded, None
        # Unless a newer version was cached meanwhile, the cache gets the blob too.
        return self._cache.fill(pending, encoded, op.json_size)

    def _landed(self, batch: list[_Op]) -> bool:
        """Did a write that raised land anyway? A batch is atomic, so its last node's
        latest version tells. (An identical earlier version would fool this; the cost is
        one identical version not stored twice.)"""
        last = [op.node for op in batch if op.node is not None][-1]
        return self.store.get_node(last.id) == last

    def _apply(self, batch: list[_Op]) -> None:
        head = batch[0]
        if head.kind == "put":
            self.store.put_execution(cast(Execution, head.execution))
        else:
            self.store.write([op.node for op in batch if op.node is not None],
                             [(op.execution_id, op.changes) for op in batch
                              if op.kind == "update"])
        self.metrics.incr("checkpoint_batches")
        self.metrics.observe("checkpoint_batch_ops", len(batch))

    def _done(self, q: _WriteQueue, batch: list[_Op], *, rejected: bool = False) -> None:
        now = time.perf_counter()
        with q.lock:
            if q.dead:  # close() gave up on these meanwhile and counted them
                return
            for op in batch:
                q.ops.popleft()
                q.unencoded_bytes -= len(op.state or b"")
                op.state = None  # the encoder must not count it out a second time
                if rejected:
                    q.rejected.append(op.seq)
                if op.node is not None:
                    if q.by_node.get(op.node.id) is op:
                        del q.by_node[op.node.id]
                    if q.by_execution.get(op.execution_id) is op:
                        del q.by_execution[op.execution_id]
            while q.raw and q.raw[0].state is None:  # written (or encoded): not raw any more
                q.raw.popleft()
            q.done_seq = batch[-1].seq
            q.done.notify_all()
            q.not_full.notify_all()
        if not rejected:
            self.metrics.incr("checkpoint_ops_written", len(batch))
            for op in batch:
                self.metrics.observe("checkpoint_durable_ms", (now - op.enqueued) * 1000.0)

    def _reject(self, q: _WriteQueue, op: _Op, exc: Exception) -> None:
        what = f"node {op.node.id}" if op.node is not None else "an execution write"
        log.error("Store %s refused %s of execution %s %d times (%s: %s); dropping it",
                  self.store.url, what, op.execution_id, _REJECT_AFTER, type(exc).__name__, exc)
        self.metrics.incr("checkpoint_rejected")
        self.metrics.incr("checkpoint_dropped")
        self._done(q, [op], rejected=True)


_GAUGES: dict[str, Callable[[CheckpointEngine], int]] = {
    "checkpoint_queue_depth": lambda engine: engine.pending,
    "checkpoint_cache_entries": lambda engine: engine._cache.entries,
    "checkpoint_cache_bytes": lambda engine: engine._cache.bytes,
}


def _gauge(ref: weakref.ref[CheckpointEngine],
           read: Callable[[CheckpointEngine], int]) -> Callable[[], float]:
    # Weak: a Metrics shared by engines (or the default one) must not keep them alive.
    def value() -> float:
        engine = ref()
        return 0.0 if engine is None else float(read(engine))
    return value


def _decoded(node: ExecutionNode) -> bytes | None:
    return None if node.checkpoint is None else decode(node.checkpoint, node_id=node.id)


_WAKE_MARGIN_S = 0.001


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


def _check_number(name: str, value: float, *, low: float, inclusive: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (value >= low if inclusive else value > low))
    if not ok:
        raise ConfigError(f"{name} must be a finite number {'>=' if inclusive else '>'} "
                          f"{low:g}, got {value!r}.")


def _reset_in_child() -> None:
    for engine in list(_engines):
        engine._after_fork_in_child()


def _flush_at_exit() -> None:
    deadline = time.monotonic() + 5.0
    for engine in list(_engines):
        if engine.pending and not engine.flush(max(deadline - time.monotonic(), 0.0)):
            log.error("Exiting with %d checkpoint writes the store %s has not taken",
                      engine.pending, engine.store.url)


os.register_at_fork(after_in_child=_reset_in_child)
atexit.register(_flush_at_exit)
