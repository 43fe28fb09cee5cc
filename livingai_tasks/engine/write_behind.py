"""WriteBehind: the ordered write-behind queue of one process (its Writer thread empties it).

Writes join a lane and leave it once the store has them (or once dropped). Two lanes: data,
and priority (lease renewals, a tool's start), served first so that a slow or refused data
write cannot make live work look orphaned; a priority write still waits for the writes it
depends on (PriorityOrder), and a data write made after a pending priority write waits for
it. One Writer thread sends them (a step's entry may send the next batch: entry.py); a store
call that hangs holds both lanes until it returns. The data lane is "memory head + disk
tail": at most `queue_max` writes in memory; under queue_full="spill" (the default) the rest
go to a Spill file, and every later write behind them until the Writer read them all back:
one order, bounded memory, the agent never held for room. The only losses, each counted in
`checkpoint_dropped`: a full queue under "drop" (or a spill the disk refuses); a write the
store refuses three times with neither a StoreError nor an OSError (see Writer); close()
with the store down under "drop" (under "spill" it spills). A process killed outright loses
what it held in memory; its spill file survives. The lock is a NoConvoyLock: a caller that
must not wait for it hands its write to the holder (defer), which queues it before it lets
go. One WriteBehind per process: a forked child starts a new one, so does a write after close().
"""

from __future__ import annotations

import atexit
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import cast

from ..codec import Codec
from ..metrics import Metrics
from ..no_convoy_lock import NoConvoyLock
from ..nodes import ExecutionNode
from ..stores.base import Fenced, Store
from .compression import Compression, encode_node
from .fenced_out import FencedOut
from .hot_cache import HotCache, count_evictions
from .ordering import PriorityOrder
from .queued_write import QueuedWrite, node_and_state
from .spill import Spill, SpillSegment
from .store_health import StoreHealth
from .writer import Writer

__all__ = ["WriteBehind", "QUEUED", "SPILLED", "DROPPED", "DEFERRED"]

log = logging.getLogger("livingai_tasks.engine")

# What submit() did with a write.
QUEUED, SPILLED, DROPPED, DEFERRED = "queued", "spilled", "dropped", "deferred"

# This process's queues that may hold writes, flushed at exit (kept alive by their threads).
_queues: weakref.WeakSet[WriteBehind] = weakref.WeakSet()


class WriteBehind:
    """The lanes, the spill, the writer thread and the compression of one process's writes."""

    def __init__(self, store: Store, metrics: Metrics, cache: HotCache, *, codec: Codec,
                 queue_max: int, queue_full: str, encode_ahead_bytes: int,
                 spill_dir: str) -> None:
        self.pid = os.getpid()
        self.store = store
        self.metrics = metrics
        self._cache = cache
        self._codec = codec
        self.queue_max = queue_max
        self._queue_full = queue_full
        self.lock = NoConvoyLock()
        self.not_empty = self.lock.condition()
        self._done = self.lock.condition()
        self.waiting = 0  # threads waiting for writes to land: the writer sends at once
        self.ops: deque[QueuedWrite] = deque()  # the data lane's memory head
        self.prio: deque[QueuedWrite] = deque()  # the priority lane
        self.spill = Spill(spill_dir, store.url)
        self._next_seq = 0
        self.done_seq = 0  # every data-lane write with seq <= done_seq is durable, or rejected
        self._rejected: deque[int] = deque(maxlen=1024)
        self.fenced_out = FencedOut(store.url, metrics)
        self.by_node: dict[str, QueuedWrite] = {}  # newest queued version of a node
        self.by_execution: dict[str, QueuedWrite] = {}  # newest queued checkpoint of an execution
        self.order = PriorityOrder()
        self.stopping = threading.Event()
        self._dead = False
        self.health = StoreHealth(store.url)
        self._restart_lock = threading.Lock()
        self.states = Compression(self.lock, cache, metrics, codec,
                                  ahead_bytes=encode_ahead_bytes, stopping=self.stopping)
        self.writer = Writer(self)

    def start(self) -> None:
        self.writer.start()
        self.states.start()
        _queues.add(self)

    # -- the callers' side ----------------------------------------------------------------
    @property
    def last_error(self) -> str:  # the store's, or what the writer waits for: for messages
        return self.health.error()

    @property
    def pending(self) -> int:  # queued (in memory or spilled), neither durable nor dropped
        return len(self.ops) + len(self.prio) + self.spill.unread

    @property
    def in_memory(self) -> int:  # held in memory: never more than queue_max per lane
        return len(self.ops) + len(self.prio)

    def will_spill(self) -> bool:
        """A lock-free guess of whether the next data write goes to the spill (the caller
        then compresses its state itself: a spilled write is stored compressed)."""
        return self._queue_full == "spill" and (
            self.spill.own_unread > 0 or len(self.ops) >= self.queue_max)

    def submit(self, op: QueuedWrite, *, wait_for_lock: bool = True) -> str:
        """Queue `op`: QUEUED (in memory), SPILLED, DROPPED (full under "drop", closed, or
        the disk refused the spill), or, with wait_for_lock=False, DEFERRED if the queue's
        lock was held: the thread holding it queues `op` before it lets go."""
        self.ensure_running()
        lane = self.prio if op.priority else self.ops
        if (not wait_for_lock and len(lane) < self.queue_max and not self._dead
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
            if len(self.prio) < self.queue_max:
                self.enqueue(op)
                return QUEUED
            op.priority = False  # a full priority lane: its overflow joins the data lane
        spilling = self.spill.own_unread > 0
        if not spilling and len(self.ops) < self.queue_max:
            self.enqueue(op)
            return QUEUED
        if self._queue_full == "drop":
            self._note("dropped", op)
            return DROPPED
        return self._spill(op)

    def _spill(self, op: QueuedWrite) -> str:
        """Append `op` to the disk tail; lock held."""
        self._encode(op)  # rare: the caller's guess (will_spill) was stale
        self._next_seq += 1
        op.seq = self._next_seq
        try:
            self.spill.append(op)
        except (OSError, sqlite3.Error) as exc:
            # The drop is logged (rate-limited) by _note, with this error.
            self.health.last_error = (f"the spill folder {self.spill.folder} refused it "
                                      f"({type(exc).__name__}: {exc})")
            self._note("dropped", op)
            return DROPPED
        self.order.spilled(op)
        if op.node is not None:
            # The cache serves it while it is on disk; an older version still in memory
            # must not shadow it.
            count_evictions(self.metrics, self._cache.put(op.node, op.json_size))
            self.by_node.pop(op.node.id, None)
            self.by_execution.pop(op.execution_id, None)
        self.metrics.incr("checkpoint_spilled")
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
        with self.lock:
            if not self._wait_until(lambda: self._is_done(op), time.monotonic() + timeout_s):
                return False
            return not (strict and op.seq in self._rejected)

    def _wait_until(self, done: Callable[[], bool], deadline: float) -> bool:
        """Wait (lock held) until done(), False at `deadline` (time.monotonic()) or once
        closed; a writer that died meanwhile is started again (the lock let go for it)."""
        self.waiting += 1
        self.not_empty.notify()  # a writer gathering a batch sends it now
        try:
            while not done():
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._dead:
                    return False
                self._done.wait(min(remaining, 0.5))
                if not self.writer.is_alive() and not self.stopping.is_set():
                    self.lock.release()
                    try:
                        self.ensure_running()
                    finally:
                        self.lock.acquire()
            return True
        finally:
            self.waiting -= 1

    def _is_done(self, op: QueuedWrite) -> bool:
        # A spilled write comes back as another object with the same seq: the data lane's
        # progress tells.
        return op.done or (not op.priority and op.seq <= self.done_seq)

    def was_rejected(self, seq: int) -> bool:
        """Whether write `seq` was dropped as refused by the store (of the last 1024)."""
        return seq in self._rejected

    def flush(self, timeout_s: float) -> bool:
        """Wait until every write queued so far (spilled ones included) is durable or
        dropped; False after `timeout_s` seconds."""
        self.ensure_running()
        deadline = time.monotonic() + timeout_s
        self.writer.claimed.wait(timeout_s)
        with self.lock:
            target, adopted = self._next_seq, list(self.spill.adopted)
            return self._wait_until(lambda: self._settled(target, adopted), deadline)

    def _settled(self, target: int, adopted: list[SpillSegment]) -> bool:
        """Nothing up to seq `target`, nor any of the claimed files `adopted`, is pending;
        lock held."""
        if self.prio and min(op.seq for op in self.prio) <= target:
            return False
        if self.ops and self.ops[0].seq <= target:
            return False
        if self.spill.own_unread and self.done_seq < target:
            return False
        return not any(segment in self.spill.adopted for segment in adopted)

    def queued(self, node_id: str) -> tuple[ExecutionNode | None, bytes | None]:
        """The newest queued version of a node, and its state if still raw."""
        with self.lock:
            return node_and_state(self.by_node.get(node_id))

    def queued_checkpoint(self, execution_id: str) -> tuple[ExecutionNode | None, bytes | None]:
        """The newest queued checkpoint-bearing version of an execution, and its raw state."""
        with self.lock:
            return node_and_state(self.by_execution.get(execution_id))

    def close(self, deadline: float) -> None:
        """Stop both threads (waiting for them until `deadline`, time.monotonic()), then spill
        what the store has not taken yet (under "drop": drop it, counted); logged with the
        store's last error."""
        with self.lock:
            self.stopping.set()
            self.not_empty.notify_all()
            self.states.stop()
        for thread in (self.writer.thread, self.states.thread):
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
            for held in (self.ops, self.prio, self.by_node, self.by_execution, self.order):
                held.clear()
            self._dead = True
            self._done.notify_all()
        spilled = 0
        if left and self._queue_full == "spill":
            try:
                self.spill.put_first([self._encode(op) for op in left])
                spilled = len(left)
                self.metrics.incr("checkpoint_spilled", spilled)
            except (OSError, sqlite3.Error) as exc:
                log.error("Could not spill %d writes to %s at close (%s: %s)", len(left),
                          self.spill.folder, type(exc).__name__, exc)
        lost = len(left) - spilled
        with self.lock:
            self.states.clear()
        on_disk = self.spill.rows
        self.spill.close()
        _queues.discard(self)
        if not (lost or spilled or still_spilled):
            return
        error = self.health.error()
        if lost:
            self.metrics.incr("checkpoint_dropped", lost)
            log.error("Checkpoint engine closed with %d writes the store %s never took "
                      "(last error: %s); they are lost (queue_full=%r).", lost, self.store.url,
                      error, self._queue_full)
        if on_disk:
            log.warning("Checkpoint engine closed with %d writes the store %s has not taken "
                        "(last error: %s); %d of them spilled now, all %d kept in %s for the "
                        "next engine on this store and spill_dir to send.", on_disk,
                        self.store.url, error, spilled, on_disk, self.spill.folder)

    def ensure_running(self) -> None:
        """Start the writer (and the encoder) again if it died; the cause was logged when it
        died. Cheap when both live."""
        if self.writer.is_alive() and self.states.thread.is_alive():
            return
        with self._restart_lock:
            if self.writer.restart_if_dead():
                self.metrics.incr("checkpoint_writer_restarts")
                log.warning("Checkpoint writer thread restarted (%d writes pending)",
                            self.pending)
            if self.states.restart_if_dead():
                self.metrics.incr("checkpoint_writer_restarts")
                log.warning("Checkpoint encoder thread restarted")

    def written(self, batch: list[QueuedWrite], *, rejected: bool = False,
                fenced: Fenced | None = None) -> None:
        """Take `batch`, the head of its lane, off it: durable, or rejected. Writes the store
        refused for their fence (`fenced`) are done too, marked: nothing can make them land."""
        if fenced:
            self.fenced_out.note(batch, fenced)
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
                self.order.written(op)
            self.states.trim()
            if not batch[0].priority:
                self.done_seq = batch[-1].seq
            self._done.notify_all()
        if not rejected:
            self.metrics.incr("checkpoint_ops_written", len(batch))
            for op in batch:
                self.metrics.observe("checkpoint_durable_ms", (now - op.enqueued) * 1000.0)

    # -- bookkeeping (lock held) ----------------------------------------------------------
    def enqueue(self, op: QueuedWrite, *, from_spill: bool = False) -> None:
        """Put `op` in its lane; lock held."""
        lane = self.prio if op.priority else self.ops
        op.enqueued = time.perf_counter()
        op.queued_behind = len(lane)
        self.order.queued(op, self.done_seq)
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
        if (len(lane) == 1 or op.priority or self.waiting
                or not op.gathers(self.writer.holds_outcomes)):
            self.not_empty.notify()  # else the writer is sending, or gathering (Writer)
        if not (from_spill and op.seq):
            self._next_seq += 1
            op.seq = self._next_seq  # last: a deferring thread that reads it finds `op` queued
        count_evictions(self.metrics, evicted)

    def _encode(self, op: QueuedWrite) -> QueuedWrite:
        """`op` with its state compressed into its node (a spilled write is stored so)."""
        if op.state is not None:
            node = cast(ExecutionNode, op.node)
            op.node, op.state = encode_node(node, op.state, self._codec, self.metrics), None
        return op

    def _note(self, what: str, op: QueuedWrite) -> None:
        """Count a drop; log drops and spills, at most once per interval each."""
        if what == "dropped":
            self.metrics.incr("checkpoint_dropped")
        subject = f"node {op.node.id}" if op.node is not None else f"{op.kind} of execution"
        where = f"queue_full={self._queue_full!r}" if what == "dropped" else self.spill.folder
        self.health.note(what, f"{what.capitalize()} %d write(s) ({where}), the latest of %s "
                         "%s: the write-behind queue is full (%d writes) or closed; store %s: "
                         "%s", subject, op.execution_id, len(self.ops), self.store.url,
                         self.health.error())


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
