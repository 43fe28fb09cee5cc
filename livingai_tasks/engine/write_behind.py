"""WriteBehind: the ordered write-behind queue of one process, and its writer thread.

Writes join a FIFO and leave it only once the store has them (or once dropped). Two lanes:
the data lane, and a priority lane (lease renewals, a non-idempotent tool's start) that the
writer serves first, so that a slow or refused data write cannot make live work look
orphaned. A priority write never overtakes an earlier write it depends on (of the same node;
of the same field of the same execution, or a put of it; any write of that execution still
in the spill; an earlier priority write of the same keys): it waits for it, without holding
up the priority writes that do not depend on it. A data write made after a pending priority
write waits for it. Caveat: the writer is one thread, so a store call that hangs (rather
than fails) holds both lanes until it returns; a refused or retried data write does not.

The data lane is "memory head + disk tail": at most `queue_max` writes in memory; with
`queue_full="spill"` (the default) the rest go to a Spill file and every later write goes
behind them until the writer has read them all back, so the order is one order, memory stays
bounded and the agent is never held for room. One writer thread takes writes in order, in
batches (one store call each), compresses the states still raw (with the encoder thread of
`Compression`) and retries until the store takes them. The only ways a write is lost, each
counted in `checkpoint_dropped`:
  * the queue is full under `queue_full="drop"` (or the spill's disk refuses the write);
  * the store fails one write three times with an error that is neither a StoreError nor
    an OSError (a store bug or an unstorable record: it is sent alone first, so only that
    write goes; also counted in `checkpoint_rejected`, logged with the node id);
  * close() with the store still not answering, under `queue_full="drop"` (under "spill"
    close() spills what is left instead).
StoreError (StoreUnavailableError included) and OSError are retried for ever, with capped
exponential backoff (50 ms doubling to 1 s, +-20 % jitter).

The writer and encoder threads are supervised: a thread that dies, whatever the exception
(a BaseException from a store call included), logs its cause once and is started again by
the next save or flush (`checkpoint_writer_restarts`); the write it was sending stays at the
head of its lane and is sent again (read back first, as for any append that raised).

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
import sqlite3
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
from .compression import Compression, encode_node
from .hot_cache import HotCache, count_evictions
from .queued_write import QueuedWrite
from .spill import Spill, SpillSegment

__all__ = ["WriteBehind", "QUEUED", "SPILLED", "DROPPED", "DEFERRED"]

log = logging.getLogger("livingai_tasks.engine")

# What submit() did with a write.
QUEUED, SPILLED, DROPPED, DEFERRED = "queued", "spilled", "dropped", "deferred"

_BATCH_NODES = 256
_BATCH_BYTES = 32 * 2**20
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 1.0  # short: once the store is back, queued writes should land promptly
_REJECT_AFTER = 3  # attempts before a write failing with a non-StoreError is dropped
_LOG_EVERY_S = 30.0
_DRAIN_ROWS = 256  # spilled writes read back per round (under the queue's lock)
# Retried for ever: the store is down or slow. OSError too, in case a store lets a raw
# socket error through unmapped: an outage must never turn into rejected writes.
_RETRY_FOREVER = (StoreError, OSError)

# Every queue of this process that may still hold writes: flushed at a normal exit. Its
# threads keep a queue alive, even past the engine that made it.
_queues: weakref.WeakSet[WriteBehind] = weakref.WeakSet()


class WriteBehind:
    """The lanes, the spill, the writer thread and the compression of one process's writes."""

    def __init__(self, store: Store, metrics: Metrics, cache: HotCache, *, codec: Codec,
                 queue_max: int, queue_full: str, encode_ahead_bytes: int,
                 spill_dir: str) -> None:
        self.pid = os.getpid()
        self.store = store
        self._metrics = metrics
        self._cache = cache
        self._codec = codec
        self._queue_max = queue_max
        self._queue_full = queue_full
        self.lock = NoConvoyLock()
        self._not_empty = self.lock.condition()
        self._done = self.lock.condition()
        self.ops: deque[QueuedWrite] = deque()  # the data lane's memory head
        self.prio: deque[QueuedWrite] = deque()  # the priority lane
        self.spill = Spill(spill_dir, store.url)
        self._next_seq = 0
        self._done_seq = 0  # every data-lane write with seq <= _done_seq is durable, or rejected
        self._rejected: deque[int] = deque(maxlen=1024)
        self._solo_until = 0  # send writes one by one up to this seq (isolating a bad one)
        self.by_node: dict[str, QueuedWrite] = {}  # newest queued version of a node
        self.by_execution: dict[str, QueuedWrite] = {}  # newest queued checkpoint of an execution
        # The newest data-lane write in memory of each conflict key, and the newest spilled
        # seq of each execution: what a priority write must wait for.
        self._data_by_key: dict[tuple[str, ...], QueuedWrite] = {}
        self._spilled_seq: dict[str, int] = {}
        self._prio_by_key: dict[tuple[str, ...], QueuedWrite] = {}  # newest priority write
        self._stopping = threading.Event()
        self._dead = False
        self.last_error = ""
        # The writer's retry bookkeeping.
        self._failures = 0  # consecutive failed attempts (reset by a success)
        self._first_failure = self._last_log = 0.0
        self._head_seq = self._head_failures = 0  # non-StoreError failures of one head write
        self._unsure: list[QueuedWrite] = []  # an append that raised: it may have landed
        self._in_flight: list[QueuedWrite] = []  # the batch the writer is sending
        self._attempt_started = 0.0  # time.monotonic() of the store call under way, or 0
        self._restart_lock = threading.Lock()
        # Set once the writer has claimed the spill files of dead processes (it does so
        # first, off the caller's thread): flush() waits for it, so that it counts them.
        self._claimed = threading.Event()
        # Drops and spills are logged once per interval, with the count: an outage with a
        # full queue must not turn every save into a log line.
        self._note_lock = threading.Lock()
        self._noted_at: dict[str, float] = {}
        self._unnoted: dict[str, int] = {}
        self.states = Compression(self.lock, cache, metrics, codec,
                                  ahead_bytes=encode_ahead_bytes, stopping=self._stopping)
        self.writer = self._writer_thread()

    def _writer_thread(self) -> threading.Thread:
        return threading.Thread(target=self._supervised_write_loop,
                                name="livingai-checkpoint-writer", daemon=True)

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
        """Writes queued (in memory or spilled) and not yet durable (nor dropped)."""
        return len(self.ops) + len(self.prio) + self.spill.unread

    @property
    def in_memory(self) -> int:
        """Writes held in memory: never more than queue_max per lane (plus the saves
        deferred to a lock holder meanwhile, see submit())."""
        return len(self.ops) + len(self.prio)

    def will_spill(self) -> bool:
        """A lock-free guess of whether the next data write goes to the spill (the caller
        then compresses its state itself: a spilled write is stored compressed)."""
        return self._queue_full == "spill" and (
            self.spill.own_unread > 0 or len(self.ops) >= self._queue_max)

    def submit(self, op: QueuedWrite, *, wait_for_lock: bool = True) -> str:
        """Queue `op`: QUEUED (in memory), SPILLED, DROPPED (full under "drop", closed, or
        the disk refused the spill), or, with wait_for_lock=False, DEFERRED if the queue's
        lock was held: the thread holding it queues `op` before it lets go."""
        self.ensure_running()
        lane = self.prio if op.priority else self.ops
        if (not wait_for_lock and len(lane) < self._queue_max and not self._dead
                and not self.spill.own_unread):
            # A thread preempted while it holds the lock would hold up every saver that waits
            # for it, for as long as it takes to win the GIL back (tens of ms with 50 busy
            # threads). The holder routes it under the lock (_route checks again), so a
            # stale read of the length here never lets a lane grow past queue_max.
            self.lock.defer(lambda: self._route(op))
            return op.outcome or DEFERRED  # set if it ran here, or the holder was quick
        with self.lock:
            return self._route(op)

    def _route(self, op: QueuedWrite) -> str:
        """Put `op` in its lane, the spill, or drop it; lock held. Sets op.outcome."""
        op.outcome = self._place(op)
        return op.outcome

    def _place(self, op: QueuedWrite) -> str:
        if self._dead:
            self._note("dropped", op)
            return DROPPED
        if op.priority:
            if len(self.prio) < self._queue_max:
                self._enqueue(op)
                return QUEUED
            op.priority = False  # a full priority lane: its overflow joins the data lane
        spilling = self.spill.own_unread > 0
        if not spilling and len(self.ops) < self._queue_max:
            self._enqueue(op)
            return QUEUED
        if self._queue_full == "drop":
            self._note("dropped", op)
            return DROPPED
        return self._spill(op)

    def _spill(self, op: QueuedWrite) -> str:
        """Append `op` to the disk tail; lock held."""
        if op.state is not None:  # rare: the caller's guess (will_spill) was stale
            op.node = encode_node(cast(ExecutionNode, op.node), op.state, self._codec,
                                  self._metrics)
            op.state = None
        self._next_seq += 1
        op.seq = self._next_seq
        try:
            self.spill.append(op)
        except (OSError, sqlite3.Error) as exc:
            self.last_error = self.last_error or f"{type(exc).__name__}: {exc}"
            log.error("Could not spill a write of execution %s to %s (%s: %s); dropping it",
                      op.execution_id, self.spill.folder, type(exc).__name__, exc)
            self._note("dropped", op)
            return DROPPED
        self._spilled_seq[op.execution_id] = op.seq
        if op.node is not None:
            # The cache serves it while it is on disk; an older version still in memory
            # must not shadow it.
            count_evictions(self._metrics, self._cache.put(op.node, op.json_size))
            self.by_node.pop(op.node.id, None)
            self.by_execution.pop(op.execution_id, None)
        self._metrics.incr("checkpoint_spilled")
        self._note("spilled", op)
        return SPILLED

    def wait(self, op: QueuedWrite, timeout_s: float, *, strict: bool = True) -> bool:
        """Whether `op` is durable within `timeout_s` seconds; with `strict`, False too if
        it was rejected."""
        if timeout_s <= 0:
            # No lock: under contention every acquisition is a place to queue behind a
            # thread that holds the lock while it waits for the GIL. Reads of an int and
            # of a deque are atomic; a stale answer only says "not yet".
            return self._is_done(op) and not (strict and op.seq in self._rejected)
        deadline = time.monotonic() + timeout_s
        with self.lock:
            while not self._is_done(op) and not self._dead:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._done.wait(remaining)
            if not self._is_done(op):
                return False
            return not (strict and op.seq in self._rejected)

    def _is_done(self, op: QueuedWrite) -> bool:
        # A spilled write comes back as another object with the same seq: the data lane's
        # progress tells.
        return op.done or (not op.priority and op.seq <= self._done_seq)

    def was_rejected(self, seq: int) -> bool:
        """Whether write `seq` was dropped because the store kept refusing it (of the last
        1024 rejections)."""
        return seq in self._rejected

    def flush(self, timeout_s: float) -> bool:
        """Wait until every write queued so far (spilled ones included) is durable or
        dropped; False after `timeout_s` seconds."""
        self.ensure_running()
        deadline = time.monotonic() + timeout_s
        self._claimed.wait(timeout_s)
        with self.lock:
            target = self._next_seq
            adopted = list(self.spill.adopted)
            while not self._settled(target, adopted):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._dead:
                    return False
                self._done.wait(min(remaining, 0.5))
                if not self.writer.is_alive() and not self._stopping.is_set():
                    self.lock.release()
                    try:
                        self.ensure_running()
                    finally:
                        self.lock.acquire()
            return True

    def _settled(self, target: int, adopted: list[SpillSegment]) -> bool:
        """Nothing up to seq `target`, nor any of the claimed files `adopted`, is pending;
        lock held."""
        if self.prio and min(op.seq for op in self.prio) <= target:
            return False
        if self.ops and self.ops[0].seq <= target:
            return False
        if self.spill.own_unread and self._done_seq < target:
            return False
        return not any(segment in self.spill.adopted for segment in adopted)

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
        """Stop both threads (waiting for them until `deadline`, time.monotonic()), then spill
        what the store has not taken yet (under "drop": drop it, counted); logged with the
        store's last error."""
        with self.lock:
            self._stopping.set()
            self._not_empty.notify_all()
            self.states.stop()
        for thread in (self.writer, self.states.thread):
            if thread.ident is not None and thread is not threading.current_thread():
                thread.join(max(deadline - time.monotonic(), 0.1))
        with self.lock:
            # Both lanes, in the order they were made: a priority write is never ahead of a
            # write it depends on, and seqs are that order.
            left = sorted([*self.prio, *self.ops], key=lambda op: op.seq)
            # Writes read back from a claimed file are still in it: they stay there, for
            # the next engine to claim (order across files was never kept).
            left = [op for op in left if op.spill is None or op.spill[0] is self.spill.own]
            still_spilled = self.spill.unread
            self.ops.clear()
            self.prio.clear()
            self.by_node.clear()
            self.by_execution.clear()
            self._data_by_key.clear()
            self._prio_by_key.clear()
            self._dead = True
            self._done.notify_all()
        lost = spilled = 0
        if left and self._queue_full == "spill":
            try:
                for op in left:
                    if op.state is not None:
                        op.node = encode_node(cast(ExecutionNode, op.node), op.state,
                                              self._codec, self._metrics)
                        op.state = None
                self.spill.put_first(left)
                spilled = len(left)
                self._metrics.incr("checkpoint_spilled", spilled)
            except (OSError, sqlite3.Error) as exc:
                log.error("Could not spill %d writes to %s at close (%s: %s)", len(left),
                          self.spill.folder, type(exc).__name__, exc)
                lost = len(left)
        else:
            lost = len(left)
        with self.lock:
            self.states.clear()
        on_disk = self.spill.rows
        self.spill.close()
        _queues.discard(self)
        if not (lost or spilled or still_spilled):
            return
        error = self.last_error or self._stall_description()
        if lost:
            self._metrics.incr("checkpoint_dropped", lost)
            log.error("Checkpoint engine closed with %d writes the store %s never took "
                      "(last error: %s); they are lost (queue_full=%r).", lost, self.store.url,
                      error, self._queue_full)
        if on_disk:
            log.warning("Checkpoint engine closed with %d writes the store %s has not taken "
                        "(last error: %s); %d of them spilled now, all %d kept in %s for the "
                        "next engine on this store and spill_dir to send.", on_disk,
                        self.store.url, error, spilled, on_disk, self.spill.folder)

    def _stall_description(self) -> str:
        started = self._attempt_started
        if started:
            return (f"no store call has failed yet: the writer's call has waited "
                    f"{time.monotonic() - started:.1f} s for the store")
        return "no store call has failed yet"

    # -- supervision ----------------------------------------------------------------------
    def ensure_running(self) -> None:
        """Start the writer (and the encoder) again if it died; the cause was logged when it
        died. Cheap when both live."""
        if (self.writer.is_alive() and self.states.thread.is_alive()) or \
                self._stopping.is_set() or self.writer.ident is None:
            return
        with self._restart_lock:
            if self._stopping.is_set():
                return
            if not self.writer.is_alive():
                with self.lock:
                    in_flight = self._in_flight
                    self._in_flight = []
                    if (in_flight and not self._unsure
                            and any(op.kind == "append" for op in in_flight)):
                        self._unsure = in_flight  # it may have landed: read back first
                self.writer = self._writer_thread()
                self.writer.start()
                self._metrics.incr("checkpoint_writer_restarts")
                log.warning("Checkpoint writer thread restarted (%d writes pending)",
                            self.pending)
            if self.states.restart_if_dead():
                self._metrics.incr("checkpoint_writer_restarts")
                log.warning("Checkpoint encoder thread restarted")

    def _supervised_write_loop(self) -> None:
        try:
            self._write_loop()
        except BaseException as exc:  # noqa: BLE001 - logged once; the next save restarts it
            log.error("Checkpoint writer thread died (%s: %s) with %d writes pending; the "
                      "next save or flush starts it again and the write it was sending is "
                      "sent again", type(exc).__name__, exc, self.pending, exc_info=exc)

    # -- the writer thread ----------------------------------------------------------------
    def _write_loop(self) -> None:
        if not self._claimed.is_set():
            try:
                adopted = self.spill.claim_orphans()
            except (OSError, sqlite3.Error) as exc:
                adopted = 0
                log.error("Could not look for spill files to claim in %s: %s",
                          self.spill.folder, exc)
            finally:
                self._claimed.set()
            if adopted:
                self._metrics.incr("checkpoint_spill_claimed", adopted)
        while True:
            with self.lock:
                self._drain_spill()
                while not self.ops and not self.prio and not self._stopping.is_set():
                    self._not_empty.wait(1.0 if self.spill.unread else None)
                    self._drain_spill()
                if self._stopping.is_set():
                    return
                # Re-formed on every attempt: after an outage, the retry of the failed head
                # carries everything queued meanwhile in one call. The head never changes
                # until it is written (or rejected), so order is kept.
                batch = self._next_batch()
                self._in_flight = batch
            try:
                backoff = self._attempt(batch)
            except Exception:  # noqa: BLE001 - the writer must outlive any bug below it
                log.exception("Checkpoint writer: unexpected error; continuing")
                backoff = _BACKOFF_MAX_S
            self._in_flight = []
            if backoff and self._stopping.wait(backoff * random.uniform(0.8, 1.2)):
                return

    def _drain_spill(self) -> None:
        """Read spilled writes back into the data lane while it has room; lock held. Only
        once the lane is half empty, so a spill drains in large reads, and only while the
        spill's order comes next (an own row is always behind every write in memory)."""
        room = self._queue_max - len(self.ops)
        if not self.spill.unread or room < max(self._queue_max // 2, 1):
            return
        ops = self.spill.read(min(room, _DRAIN_ROWS), self._corrupt_spill_row)
        for op in ops:
            segment = op.spill[0] if op.spill is not None else None
            if segment is not self.spill.own:
                op.seq = 0  # a claimed file's seqs were its process's: this one numbers it
            self._enqueue(op, from_spill=True)
        if ops:
            self._metrics.incr("checkpoint_spill_drained", len(ops))

    def _corrupt_spill_row(self, row_id: int, what: str) -> None:
        self._metrics.incr("checkpoint_dropped")
        log.error("Spilled write unreadable, dropped: %s", what)

    def _next_batch(self) -> list[QueuedWrite]:
        """The priority lane's head if it may go (every data write it depends on is done),
        else the data lane's; consecutive appends and updates (capped) of that lane, written
        as one store.write(), or one put; lock held. A step queues its RUNNING version and
        its lease back to back: they land in one round trip."""
        ready = [op for op in self.prio if self._ready(op)]
        if ready or not self.ops:
            # Priority writes that may go, in order; one whose dependencies have not landed
            # waits without holding up the others. (None ready and no data write in memory:
            # what it waits for was lost from the spill; send it rather than wait forever.)
            lane = ready or [self.prio[0]]
            until = None
        else:
            lane = list(self.ops) if len(self.ops) <= _BATCH_NODES else \
                [self.ops[i] for i in range(_BATCH_NODES)]
            # A data write made after a pending priority write may depend on it (a lease
            # released after it was renewed): the data lane stops short of it until it
            # lands. The head itself is always older than a waiting priority write (that
            # write waits for an earlier data write, which is at or behind the head).
            until = self.prio[0].seq if self.prio else None
        head = lane[0]
        batch = [head]
        if head.kind == "put" or head.seq <= self._solo_until:
            return batch
        size = head.size
        for op in lane[1:]:
            if (op.kind == "put" or len(batch) >= _BATCH_NODES or size + op.size > _BATCH_BYTES
                    or (until is not None and op.seq > until)):
                break
            batch.append(op)
            size += op.size
        return batch

    def _ready(self, op: QueuedWrite) -> bool:
        """Whether priority write `op` may be sent: every write it depends on has landed."""
        return op.after_seq <= self._done_seq and (op.after_prio is None or op.after_prio.done)

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
                self._attempt_started = time.monotonic()
                self._apply(batch)
        except Exception as exc:
            self._attempt_started = 0.0
            return self._failed(batch, exc)
        self._attempt_started = 0.0
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
                        self.store.url, self.last_error, self.pending)
        elif now - self._last_log >= _LOG_EVERY_S:
            self._last_log = now
            log.warning("Store %s still failing after %.0f s and %d attempts (%s); "
                        "%d writes queued (%d spilled)", self.store.url,
                        now - self._first_failure, self._failures, self.last_error,
                        self.pending, self.spill.unread)
        # Connection trouble is retried for ever. Anything else may be one bad record
        # (or a store bug): isolate it, then drop it after a few tries rather than
        # wedge every later write behind it.
        if not isinstance(exc, _RETRY_FOREVER):
            if len(batch) > 1:
                with self.lock:
                    self._solo_until = max(op.seq for op in batch)
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
        """Take `batch`, the head of its lane, off it: durable, or rejected."""
        now = time.perf_counter()
        # First off the disk (the store has them), then off the lanes: once a caller sees
        # them done, the spill's size no longer counts them.
        spilled = {id(op.spill[0]): op.spill for op in batch if op.spill is not None}
        for segment, row_id in spilled.values():
            try:
                self.spill.written(segment, row_id)
            except (OSError, sqlite3.Error) as exc:  # the rows are sent again by whoever claims it
                log.warning("Could not delete written rows from the spill file %s: %s",
                            segment.path, exc)
        with self.lock:
            if self._dead:  # close() took these over meanwhile
                return
            for op in batch:
                if op.priority:
                    self.prio.remove(op)  # not always the head: see _next_batch
                else:
                    self.ops.popleft()
                op.done = True
                self.states.written(op)
                if rejected:
                    self._rejected.append(op.seq)
                if op.node is not None:
                    if self.by_node.get(op.node.id) is op:
                        del self.by_node[op.node.id]
                    if self.by_execution.get(op.execution_id) is op:
                        del self.by_execution[op.execution_id]
                for key in op.conflict_keys():
                    by_key = self._prio_by_key if op.priority else self._data_by_key
                    if by_key.get(key) is op:
                        del by_key[key]
                if not op.priority and self._spilled_seq.get(op.execution_id, -1) <= op.seq:
                    self._spilled_seq.pop(op.execution_id, None)
            self.states.trim()
            if not batch[0].priority:
                self._done_seq = batch[-1].seq
            self._done.notify_all()
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

    # -- bookkeeping (lock held) ----------------------------------------------------------
    def _enqueue(self, op: QueuedWrite, *, from_spill: bool = False) -> None:
        """Put `op` in its lane; lock held."""
        lane = self.prio if op.priority else self.ops
        op.enqueued = time.perf_counter()
        op.queued_behind = len(lane)
        if op.priority:
            # Never ahead of an earlier data write it depends on: wait for the newest of them
            # (in memory), or for the execution's newest spilled write (its keys are on disk).
            deps = [dep.seq for key in op.conflict_keys()
                    + [("put", op.execution_id)] if (dep := self._data_by_key.get(key))]
            spilled = self._spilled_seq.get(op.execution_id, 0)
            op.after_seq = max([*deps, spilled if spilled > self._done_seq else 0])
            # ... nor of an earlier priority write of the same keys.
            for key in op.conflict_keys():
                earlier = self._prio_by_key.get(key)
                if earlier is not None and (op.after_prio is None
                                            or earlier.seq > op.after_prio.seq):
                    op.after_prio = earlier
                self._prio_by_key[key] = op
        else:
            for key in op.conflict_keys():
                self._data_by_key[key] = op
        lane.append(op)
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
        if not (from_spill and op.seq):
            self._next_seq += 1
            op.seq = self._next_seq  # last: a deferring thread that reads it finds `op` queued
        count_evictions(self._metrics, evicted)

    def _note(self, what: str, op: QueuedWrite) -> None:
        """Count a drop and log drops and spills, at most once per interval each."""
        if what == "dropped":
            self._metrics.incr("checkpoint_dropped")
        with self._note_lock:
            self._unnoted[what] = self._unnoted.get(what, 0) + 1
            now = time.monotonic()
            if self._noted_at.get(what) and now - self._noted_at[what] < _LOG_EVERY_S:
                return
            count, self._unnoted[what], self._noted_at[what] = self._unnoted[what], 0, now
        subject = f"node {op.node.id}" if op.node is not None else f"{op.kind} of execution"
        if what == "dropped":
            log.warning("Dropped %d write(s), the latest of %s %s: the write-behind queue is "
                        "full (%d writes, queue_full=%r) or closed; store %s: %s", count,
                        subject, op.execution_id, len(self.ops), self._queue_full,
                        self.store.url, self.last_error or self._stall_description())
        else:
            log.warning("Spilled %d write(s) to %s, the latest of %s %s: the write-behind "
                        "queue is full (%d writes); store %s: %s", count, self.spill.folder,
                        subject, op.execution_id, len(self.ops), self.store.url,
                        self.last_error or self._stall_description())


def _flush_at_exit() -> None:
    # Up to 5 s for the store, then close(): under "spill" what is left goes to disk for the
    # next engine (logged with the store's last error), under "drop" it is counted lost.
    deadline = time.monotonic() + 5.0
    for queue in list(_queues):
        if queue.pid != os.getpid() or not queue.pending:
            continue
        if not queue.flush(max(deadline - time.monotonic(), 0.0)):
            queue.close(deadline)


atexit.register(_flush_at_exit)
