"""WriteBehind: the ordered write-behind queue of one process, and its writer thread.

Writes join a FIFO and leave it only once the store has them (or once dropped), so its
length is exactly what is pending and `queue_max` bounds it. One writer thread takes them
in order, in batches (one store call each), compresses the states still raw (with the
encoder thread of `Compression`) and retries until the store takes them. A write that
overruns the caller's budget is not dropped: the caller goes on, the write stays queued,
and the writer retries it, in order, until the store has it. The only way a write is lost
is a drop, and every drop is counted (`checkpoint_dropped`):
  * the queue is full (`queue_full="drop"` at once, `"block"` after `queue_block_s`);
  * the store fails one write three times with an error that is neither a StoreError nor
    an OSError (a store bug or an unstorable record: it is sent alone first, so only that
    write goes; also counted in `checkpoint_rejected`, logged with the node id);
  * close() gives up on writes the store still has not taken after its timeout.
StoreError (StoreUnavailableError included) and OSError are retried for ever, with capped
exponential backoff (50 ms doubling to 1 s, +-20 % jitter).

The queue's lock is a NoConvoyLock, and a caller that must not wait for it hands its
write to the thread holding it (NoConvoyLock.defer), which queues it before it lets go.
One WriteBehind per process: a forked child starts a new one (the parent's threads do not
exist there), and so does a write after close().
"""

from __future__ import annotations

import atexit
import logging
import os
import random
import threading
import time
import weakref
from collections import deque
from typing import cast

from ..codec import Codec
from ..errors import StoreError
from ..metrics import Metrics
from ..no_convoy_lock import NoConvoyLock
from ..nodes import Execution, ExecutionNode
from ..stores.base import Store
from .compression import Compression
from .hot_cache import HotCache, count_evictions
from .queued_write import QueuedWrite

__all__ = ["WriteBehind"]

log = logging.getLogger("livingai_tasks.engine")

_BATCH_NODES = 256
_BATCH_BYTES = 32 * 2**20
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 1.0  # short: once the store is back, queued writes should land promptly
_REJECT_AFTER = 3  # attempts before a write failing with a non-StoreError is dropped
_LOG_EVERY_S = 30.0
# Retried for ever: the store is down or slow. OSError too, in case a store lets a raw
# socket error through unmapped: an outage must never turn into rejected writes.
_RETRY_FOREVER = (StoreError, OSError)

# Every queue of this process that may still hold writes: flushed at a normal exit. Its
# threads keep a queue alive, even past the engine that made it.
_queues: weakref.WeakSet[WriteBehind] = weakref.WeakSet()


class WriteBehind:
    """The FIFO, the writer thread and the compression of one process's writes."""

    def __init__(self, store: Store, metrics: Metrics, cache: HotCache, *, codec: Codec,
                 queue_max: int, queue_full: str, queue_block_s: float,
                 encode_ahead_bytes: int) -> None:
        self.pid = os.getpid()
        self.store = store
        self._metrics = metrics
        self._cache = cache
        self._queue_max = queue_max
        self._queue_full = queue_full
        self._queue_block_s = queue_block_s
        self.lock = NoConvoyLock()
        self._not_empty = self.lock.condition()
        self._not_full = self.lock.condition()
        self._done = self.lock.condition()
        self.ops: deque[QueuedWrite] = deque()
        self._next_seq = 0
        self._done_seq = 0  # every write with seq <= _done_seq is durable, or rejected
        self._rejected: deque[int] = deque(maxlen=1024)
        self._solo_until = 0  # send writes one by one up to this seq (isolating a bad one)
        self.by_node: dict[str, QueuedWrite] = {}  # newest queued version of a node
        self.by_execution: dict[str, QueuedWrite] = {}  # newest queued checkpoint of an execution
        self._stopping = threading.Event()
        self._dead = False
        self.last_error = ""
        # The writer's retry bookkeeping.
        self._failures = 0  # consecutive failed attempts (reset by a success)
        self._first_failure = self._last_log = 0.0
        self._head_seq = self._head_failures = 0  # non-StoreError failures of one head write
        self._unsure: list[QueuedWrite] = []  # an append that raised: it may have landed
        # Drops are logged once per interval, with the count: an outage with a full queue
        # must not turn every save into a log line.
        self._drop_log_lock = threading.Lock()
        self._drop_logged_at = 0.0
        self._drops_unlogged = 0
        self.states = Compression(self.lock, cache, metrics, codec,
                                  ahead_bytes=encode_ahead_bytes, stopping=self._stopping)
        self.writer = threading.Thread(target=self._write_loop, name="livingai-checkpoint-writer",
                                       daemon=True)

    def start(self) -> None:
        self.writer.start()
        self.states.start()
        _queues.add(self)

    # -- the callers' side ----------------------------------------------------------------
    @property
    def queue_max(self) -> int:
        return self._queue_max

    @property
    def pending(self) -> int:
        """Writes queued and not yet durable (nor dropped)."""
        return len(self.ops)

    def submit(self, op: QueuedWrite, *, wait_for_lock: bool = True) -> int | None:
        """Queue `op`: its seq, or None if dropped (queue full, closed). With
        wait_for_lock=False, 0 if the queue's lock was held: the thread holding it queues
        `op` before it lets go, and this one returns at once."""
        if not wait_for_lock and len(self.ops) < self._queue_max and not self._dead:
            # A thread preempted while it holds the lock would hold up every saver that waits
            # for it, for as long as it takes to win the GIL back (tens of ms with 50 busy
            # threads). Read without the lock, the length may be stale: the queue can then
            # exceed queue_max by the saves deferred meanwhile.
            self.lock.defer(lambda: self._enqueue_deferred(op))
            return op.seq
        with self.lock:
            if len(self.ops) >= self._queue_max and self._queue_full == "block":
                deadline = time.monotonic() + self._queue_block_s
                while len(self.ops) >= self._queue_max and not self._dead:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._not_full.wait(remaining)
            depth = len(self.ops)
            if depth >= self._queue_max or self._dead:
                seq = None
            else:
                self._enqueue(op)
                seq = op.seq
        if seq is None:
            self._note_drop(op, depth)
        return seq

    def wait(self, seq: int, timeout_s: float, *, strict: bool = True) -> bool:
        """Whether every write up to `seq` is durable within `timeout_s` seconds; with
        `strict`, False too if write `seq` was rejected."""
        if timeout_s <= 0:
            # No lock: under contention every acquisition is a place to queue behind a
            # thread that holds the lock while it waits for the GIL. Reads of an int and
            # of a deque are atomic; a stale answer only says "not yet".
            return self._done_seq >= seq and not (strict and seq in self._rejected)
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while self._done_seq < seq and not self._dead:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._done.wait(remaining)
            if self._done_seq < seq:
                return False
            return not (strict and seq in self._rejected)

    def was_rejected(self, seq: int) -> bool:
        """Whether write `seq` was dropped because the store kept refusing it (of the last
        1024 rejections)."""
        return seq in self._rejected

    def flush(self, timeout_s: float) -> bool:
        """Wait until every write queued so far is durable or dropped; False after
        `timeout_s` seconds."""
        with self.lock:
            target = self._next_seq
        return self.wait(target, timeout_s, strict=False)

    def queued(self, node_id: str) -> tuple[ExecutionNode | None, bytes | None]:
        """The newest queued version of a node, and its state if still raw."""
        with self.lock:
            op = self.by_node.get(node_id)
            return (op.node, op.state) if op is not None else (None, None)

    def queued_checkpoint(self, execution_id: str) -> tuple[ExecutionNode | None, bytes | None]:
        """The newest queued checkpoint-bearing version of an execution, and its raw state."""
        with self.lock:
            op = self.by_execution.get(execution_id)
            return (op.node, op.state) if op is not None else (None, None)

    def close(self, deadline: float) -> None:
        """Stop both threads (waiting for them until `deadline`, time.monotonic()) and drop
        what the store has not taken yet: counted in `checkpoint_dropped`, logged."""
        with self.lock:
            self._stopping.set()
            self._not_empty.notify_all()
            self.states.stop()
        for thread in (self.writer, self.states.thread):
            if thread.ident is not None and thread is not threading.current_thread():
                thread.join(max(deadline - time.monotonic(), 0.1))
        with self.lock:
            lost = len(self.ops)
            self.ops.clear()
            self.by_node.clear()
            self.by_execution.clear()
            self.states.clear()
            self._dead = True
            self._done.notify_all()
            self._not_full.notify_all()
        _queues.discard(self)
        if lost:
            self._metrics.incr("checkpoint_dropped", lost)
            log.error("Checkpoint engine closed with %d writes the store %s never took "
                      "(last error: %s); they are lost.", lost, self.store.url, self.last_error)

    def _enqueue_deferred(self, op: QueuedWrite) -> None:
        if self._dead:  # closed since: its pending writes were dropped, and so is this one
            self._note_drop(op, len(self.ops))
        else:
            self._enqueue(op)

    def _enqueue(self, op: QueuedWrite) -> None:
        """Put `op` on the queue; lock held."""
        op.enqueued = time.perf_counter()
        op.queued_behind = len(self.ops)
        self.ops.append(op)
        evicted = 0
        if op.node is not None:
            # Under the queue lock, so the cache and the queue agree on which of two
            # racing versions is the newer; a dropped version is never cached.
            evicted = self._cache.put(op.node, op.json_size)
            self.by_node[op.node.id] = op
            if op.node.checkpoint is not None or op.state is not None:
                self.by_execution[op.execution_id] = op
            if op.state is not None:
                self.states.add(op)
        self._not_empty.notify()
        self._next_seq += 1
        op.seq = self._next_seq  # last: a deferring thread that reads it finds `op` queued
        count_evictions(self._metrics, evicted)

    def _note_drop(self, op: QueuedWrite, depth: int) -> None:
        self._metrics.incr("checkpoint_dropped")
        with self._drop_log_lock:
            self._drops_unlogged += 1
            now = time.monotonic()
            if now - self._drop_logged_at < _LOG_EVERY_S and self._drop_logged_at:
                return
            count, self._drops_unlogged, self._drop_logged_at = self._drops_unlogged, 0, now
        what = f"node {op.node.id}" if op.node is not None else f"{op.kind} of execution"
        log.warning("Dropped %d write(s), the latest of %s %s: the write-behind queue is full "
                    "(%d writes, policy %r); store %s: %s", count, what, op.execution_id,
                    depth, self._queue_full, self.store.url, self.last_error or "slow")

    # -- the writer thread ----------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            with self.lock:
                while not self.ops and not self._stopping.is_set():
                    self._not_empty.wait()
                if self._stopping.is_set():
                    return
                # Re-formed on every attempt: after an outage, the retry of the failed head
                # carries everything queued meanwhile in one call. The head never changes
                # until it is written (or rejected), so order is kept.
                batch = self._next_batch()
            try:
                backoff = self._attempt(batch)
            except Exception:  # noqa: BLE001 - the writer must outlive any bug below it
                log.exception("Checkpoint writer: unexpected error; continuing")
                backoff = _BACKOFF_MAX_S
            if backoff and self._stopping.wait(backoff * random.uniform(0.8, 1.2)):
                return

    def _next_batch(self) -> list[QueuedWrite]:
        """Consecutive appends and updates (capped), written as one store.write(), or one
        put; lock held. A step queues its RUNNING version and its lease back to back: they
        land in one round trip."""
        head = self.ops[0]
        batch = [head]
        if head.kind == "put" or head.seq <= self._solo_until:
            return batch
        size = head.size
        for op in self.ops:
            if op is head:
                continue
            if op.kind == "put" or len(batch) >= _BATCH_NODES or size + op.size > _BATCH_BYTES:
                break
            batch.append(op)
            size += op.size
        return batch

    def _attempt(self, batch: list[QueuedWrite]) -> float:
        """One try at writing `batch`; returns how long to back off before the next (s)."""
        try:
            if self._unsure and self._unsure[0] is batch[0] and self._landed(self._unsure):
                # The failed attempt did reach the store (its reply was lost): resending
                # would append every version of it a second time.
                self._metrics.incr("checkpoint_found_after_error", len(self._unsure))
                batch, self._unsure = self._unsure, []
            else:
                self._unsure = []
                self.states.encode_batch(batch)
                self._apply(batch)
        except Exception as exc:
            return self._failed(batch, exc)
        if self._failures:
            log.info("Store %s took writes again after %d failed attempts (%.1f s)",
                     self.store.url, self._failures, time.monotonic() - self._first_failure)
            self._failures = 0
        self._written(batch)
        return 0.0

    def _failed(self, batch: list[QueuedWrite], exc: Exception) -> float:
        """Book a failed attempt at `batch`; returns how long to back off (s)."""
        if any(op.kind == "append" for op in batch) and not self._unsure:
            self._unsure = batch
        now = time.monotonic()
        self._failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        self._metrics.incr("checkpoint_store_errors")
        if self._failures == 1:
            self._first_failure = self._last_log = now
            log.warning("Store %s failed a write (%s); %d writes queued, retrying",
                        self.store.url, self.last_error, len(self.ops))
        elif now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            log.warning("Store %s still failing after %.0f s and %d attempts (%s); "
                        "%d writes queued", self.store.url, now - self._first_failure,
                        self._failures, self.last_error, len(self.ops))
        # Connection trouble is retried for ever. Anything else may be one bad record
        # (or a store bug): isolate it, then drop it after a few tries rather than
        # wedge every later write behind it.
        if not isinstance(exc, _RETRY_FOREVER):
            if len(batch) > 1:
                with self.lock:
                    self._solo_until = batch[-1].seq
                return 0.0
            same_head = self._head_seq == batch[0].seq
            self._head_failures = self._head_failures + 1 if same_head else 1
            self._head_seq = batch[0].seq
            if self._head_failures >= _REJECT_AFTER:
                self._reject(batch[0], exc)
                return 0.0
        self._metrics.incr("checkpoint_retries")
        return min(_BACKOFF_FIRST_S * 2.0 ** (self._failures - 1), _BACKOFF_MAX_S)

    def _landed(self, batch: list[QueuedWrite]) -> bool:
        """Did a write that raised land anyway? A batch is atomic, so its last node's
        latest version tells. (An identical earlier version would fool this; the cost is
        one identical version not stored twice.)"""
        last = [op.node for op in batch if op.node is not None][-1]
        return self.store.get_node(last.id) == last

    def _apply(self, batch: list[QueuedWrite]) -> None:
        head = batch[0]
        if head.kind == "put":
            self.store.put_execution(cast(Execution, head.execution))
        else:
            self.store.write([op.node for op in batch if op.node is not None],
                             [(op.execution_id, op.changes) for op in batch
                              if op.kind == "update"])
        self._metrics.incr("checkpoint_batches")
        self._metrics.observe("checkpoint_batch_ops", len(batch))

    def _written(self, batch: list[QueuedWrite], *, rejected: bool = False) -> None:
        """Take `batch`, the head of the queue, off it: durable, or rejected."""
        now = time.perf_counter()
        with self.lock:
            if self._dead:  # close() gave up on these meanwhile and counted them
                return
            for op in batch:
                self.ops.popleft()
                self.states.written(op)
                if rejected:
                    self._rejected.append(op.seq)
                if op.node is not None:
                    if self.by_node.get(op.node.id) is op:
                        del self.by_node[op.node.id]
                    if self.by_execution.get(op.execution_id) is op:
                        del self.by_execution[op.execution_id]
            self.states.trim()
            self._done_seq = batch[-1].seq
            self._done.notify_all()
            self._not_full.notify_all()
        if not rejected:
            self._metrics.incr("checkpoint_ops_written", len(batch))
            for op in batch:
                self._metrics.observe("checkpoint_durable_ms", (now - op.enqueued) * 1000.0)

    def _reject(self, op: QueuedWrite, exc: Exception) -> None:
        what = f"node {op.node.id}" if op.node is not None else "an execution write"
        log.error("Store %s refused %s of execution %s %d times (%s: %s); dropping it",
                  self.store.url, what, op.execution_id, _REJECT_AFTER, type(exc).__name__, exc)
        self._metrics.incr("checkpoint_rejected")
        self._metrics.incr("checkpoint_dropped")
        self._written([op], rejected=True)


def _flush_at_exit() -> None:
    deadline = time.monotonic() + 5.0
    for queue in list(_queues):
        if queue.pid != os.getpid() or not queue.pending:
            continue
        if not queue.flush(max(deadline - time.monotonic(), 0.0)):
            log.error("Exiting with %d checkpoint writes the store %s has not taken",
                      queue.pending, queue.store.url)


atexit.register(_flush_at_exit)
