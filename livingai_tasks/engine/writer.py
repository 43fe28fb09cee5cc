"""Writer: the thread that empties one write-behind queue into the store.

It takes the priority lane's writes that may go (PriorityOrder), else the data lane's head,
in batches (one store call each: a step's RUNNING version and its lease land in one round
trip; the data lane gathers for GATHER_S first, so a quick step's outcome joins them, and
the RUNNING version it supersedes is left out: see coalesced()). On a store whose step
entry can carry a batch (WritesBeforeEntry), an idempotent step's outcome is held up to
OUTCOME_HOLD_S and the next step's entry sends it (borrow, give_back; entry.py). It
compresses the states still raw, and retries until the store takes them: StoreError
(StoreUnavailableError included) and OSError for ever, with capped exponential backoff
(StoreHealth); anything else may be one bad record, so a failing batch is sent one write at
a time and a write refused three times is dropped (`checkpoint_rejected`). An append that
raised may have landed (its reply lost): it is read back before it is sent again. It reads
spilled writes back into the data lane as room frees up, and first claims the spill files of
dead processes.

Supervised: whatever kills the thread (a BaseException from a store call included) is
logged once with its cause, and the next save or flush starts a new one
(`checkpoint_writer_restarts`); the batch it was sending stays at the head of its lane and
is sent again, read back first if it held appends.
"""

from __future__ import annotations

import logging
import random
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, cast

from ..errors import RecordRefusedError, StoreError
from ..nodes import Execution, ExecutionNode
from ..stores.base import Fenced, SetsAside, Updates, WritesBeforeEntry
from .queued_write import QueuedWrite
from .sanitise import sanitise_write, set_aside_text

if TYPE_CHECKING:
    from .write_behind import WriteBehind

__all__ = ["Writer", "coalesced", "batch_writes"]

log = logging.getLogger("livingai_tasks.engine")

_BATCH_NODES = 256
# How long the data lane may gather writes before the writer sends them: a step's RUNNING
# version, its lease and its SUCCESS, queued within this window, land in one store call
# (one transaction on the SQL stores) instead of two. Only writes nobody waits for are
# held, and only behind a write that more are likely to follow (a RUNNING version, a
# lease): an outcome, a durable save, a flush and a priority write cut it short, so a
# quick step waits for nothing and only a step still running at the end of the window
# pays a second call. 50 ms, the default budget: steps of a quick tool or a cached model
# call (the fleet benchmark's 20 ms steps) fit in it; 5 ms did not, and the second
# transaction cost such a step ~0.9 ms of CPU on PostgreSQL and ~2.4 ms on tiered (medians,
# loadtest/README, "A step's start and outcome in one transaction up to 50 ms").
# What is held is an idempotent step's bookkeeping (a tool's start is waited for, so never
# held): if the process dies meanwhile, the lease covers it, as it does for any write
# still queued.
GATHER_S = 0.05
# How long an idempotent step's outcome waits for the next step this process starts, on a
# store whose entry can carry it (entry.py): one round trip a step instead of two. A busy
# pool child starts its next step within a few ms; an idle one gains nothing by waiting,
# and its records should not trail the step by more than this.
OUTCOME_HOLD_S = 0.01
_BATCH_BYTES = 32 * 2**20
_REJECT_AFTER = 3  # attempts before a write failing with a non-StoreError is dropped
_AFTER_BUG_S = 1.0  # backoff after an unexpected error in the writer itself
_DRAIN_ROWS = 256  # spilled writes read back per round (under the queue's lock)
# Retried for ever: the store is down or slow. OSError too, in case a store lets a raw
# socket error through unmapped: an outage must never turn into rejected writes.
_RETRY_FOREVER = (StoreError, OSError)


def coalesced(nodes: list[ExecutionNode]) -> list[ExecutionNode]:
    """`nodes` without the versions that a later version of the same node in the same
    batch supersedes (ExecutionNode.is_supersedable): landing in one transaction with
    it, such a version tells no reader anything and would store the step's input twice."""
    last = {node.id: i for i, node in enumerate(nodes)}
    return [node for i, node in enumerate(nodes)
            if last[node.id] == i or not node.is_supersedable()]


def batch_writes(batch: list[QueuedWrite]) -> tuple[list[ExecutionNode], Updates]:
    """A batch's node versions (coalesced) and execution updates, as store.write() takes
    them."""
    return (coalesced([op.node for op in batch if op.node]),
            [(op.execution_id, op.changes) for op in batch if op.kind == "update"])


class Writer:
    """The writer thread of one WriteBehind `q` (its lanes, lock and bookkeeping are q's)."""

    def __init__(self, q: WriteBehind) -> None:
        self.q = q
        self._unsure: list[QueuedWrite] = []  # an append that raised: it may have landed
        self._in_flight: list[QueuedWrite] = []  # the batch being sent
        self._solo_until = 0  # send writes one by one up to this seq (isolating a bad one)
        self._sanitised: QueuedWrite | None = None  # refused once, sanitised, sent again
        self._borrowed = False  # a step's entry is sending the data lane's head (borrow)
        # A step's entry can carry the writes queued before it: outcomes wait for it (entry.py)
        self.holds_outcomes = isinstance(q.store, WritesBeforeEntry)
        # Set once the spill files of dead processes are claimed (first thing, off the
        # caller's thread): flush() waits for it, so that it counts them.
        self.claimed = threading.Event()
        self.thread = self._new_thread()

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._supervised_loop, name="livingai-checkpoint-writer",
                                daemon=True)

    def start(self) -> None:
        self.thread.start()

    def is_alive(self) -> bool:
        return self.thread.is_alive()

    def restart_if_dead(self) -> bool:
        """Start a new thread if this one died (not if it was never started, or stopped);
        whether it did. The batch in flight is read back before it is sent again."""
        if self.thread.ident is None or self.thread.is_alive() or self.q.stopping.is_set():
            return False
        with self.q.lock:
            in_flight, self._in_flight = self._in_flight, []
            if in_flight and not self._unsure and any(op.kind == "append" for op in in_flight):
                self._unsure = in_flight
        self.thread = self._new_thread()
        self.thread.start()
        return True

    def _supervised_loop(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # noqa: BLE001 - logged once; the next save restarts it
            log.error("Checkpoint writer thread died (%s: %s) with %d writes pending; the "
                      "next save or flush starts it again and the write it was sending is "
                      "sent again", type(exc).__name__, exc, self.q.pending, exc_info=exc)

    def _loop(self) -> None:
        if not self.claimed.is_set():
            try:
                adopted = self.q.spill.claim_orphans()
            except (OSError, sqlite3.Error) as exc:
                adopted = 0
                log.error("Could not look for spill files to claim in %s: %s",
                          self.q.spill.folder, exc)
            finally:
                self.claimed.set()
            if adopted:
                self.q.metrics.incr("checkpoint_spill_claimed", adopted)
        while True:
            with self.q.lock:
                self._drain_spill()
                while not self._has_work() and not self.q.stopping.is_set():
                    self.q.not_empty.wait(1.0 if self.q.spill.unread else None)
                    self._drain_spill()
                gather = self._gather_s()
                while gather > 0 and not self.q.stopping.is_set():
                    self.q.not_empty.wait(gather)
                    gather = self._gather_s()
                if self.q.stopping.is_set():
                    return
                if not self._has_work():
                    continue  # a step's entry took what was gathered (borrow)
                # Re-formed on every attempt: after an outage, the retry of the failed head
                # carries everything queued meanwhile in one call. The head never changes
                # until it is written (or rejected), so order is kept.
                batch = self._next_batch()
                self._in_flight = batch
            try:
                backoff = self._attempt(batch)
            except Exception:  # noqa: BLE001 - the writer must outlive any bug below it
                log.exception("Checkpoint writer: unexpected error; continuing")
                backoff = _AFTER_BUG_S
            self._in_flight = []
            if backoff and self.q.stopping.wait(backoff * random.uniform(0.8, 1.2)):
                return

    def _has_work(self) -> bool:
        """Writes to send, and no step's entry sending the data lane's head (borrow)."""
        return bool(self.q.ops or self.q.prio) and not self._borrowed

    def _gather_s(self) -> float:
        """How much longer the data lane gathers before it is sent (see GATHER_S); lock
        held. Nothing is held while anyone waits, nor once a write that ends a step's
        records was queued last (QueuedWrite.gathers), nor behind a priority write, a spill
        being read back, a full batch or a failed one (sent again at once)."""
        q = self.q
        if (not q.ops or q.prio or q.waiting or q.spill.unread or len(q.ops) >= _BATCH_NODES
                or self._borrowed or self._unsure
                or not q.ops[-1].gathers(self.holds_outcomes)):
            return 0.0
        now = time.perf_counter()
        left = GATHER_S - (now - q.ops[0].enqueued)
        if not q.ops[-1].precedes_more:  # an outcome held for the next step's entry
            left = min(left, OUTCOME_HOLD_S - (now - q.ops[-1].enqueued))
        return left

    # -- a step's entry sends what the writer gathered (WritesBeforeEntry) -----------------
    def borrow(self) -> list[QueuedWrite] | None:
        """The data lane's next batch, for the caller to send with a step's entry in one
        store call; None when the writer should send it itself (it is sending, a priority
        write or a spill is waiting, the store is failing, a batch is being retried).
        The writer sends nothing until give_back()."""
        q = self.q
        with q.lock:
            if (self._borrowed or self._in_flight or self._unsure or not q.ops or q.prio
                    or q.spill.unread or q.health.failures or q.stopping.is_set()
                    or q.ops[0].kind == "put" or q.ops[0].seq <= self._solo_until
                    or not self.thread.is_alive()):
                return None
            batch = self._next_batch()
            self._in_flight, self._borrowed = batch, True
        try:
            q.states.encode_batch(batch)
        except BaseException:
            self.give_back(batch, failed=True)
            raise
        return batch

    def give_back(self, batch: list[QueuedWrite], *, failed: bool = False,
                  fenced: Fenced | None = None) -> None:
        """The borrowed `batch` was sent: written (refused for its fence: `fenced`), or
        `failed`, then the writer sends it again, read back first (it may have landed)."""
        q = self.q
        if not failed:
            q.health.succeeded()
            q.written(batch, fenced=fenced)
            q.metrics.incr("checkpoint_batches")
            q.metrics.incr("checkpoint_batches_with_entry")
            q.metrics.observe("checkpoint_batch_ops", len(batch))
        else:
            q.metrics.incr("checkpoint_store_errors")
        with q.lock:
            if failed and any(op.kind == "append" for op in batch):
                self._unsure = batch
            self._in_flight, self._borrowed = [], False
            q.not_empty.notify()

    def _drain_spill(self) -> None:
        """Read spilled writes back into the data lane while it has room; lock held. Only
        once the lane is half empty, so a spill drains in large reads, and only while the
        spill's order comes next (an own row is always behind every write in memory)."""
        room = self.q.queue_max - len(self.q.ops)
        if not self.q.spill.unread or room < max(self.q.queue_max // 2, 1):
            return
        ops = self.q.spill.read(min(room, _DRAIN_ROWS), self._corrupt_spill_row)
        for op in ops:
            segment = op.spill[0] if op.spill is not None else None
            if segment is not self.q.spill.own:
                op.seq = 0  # a claimed file's seqs were its process's: this one numbers it
            self.q.enqueue(op, from_spill=True)
        if ops:
            self.q.metrics.incr("checkpoint_spill_drained", len(ops))

    def _corrupt_spill_row(self, row_id: int, what: str) -> None:
        self.q.metrics.incr("checkpoint_dropped")
        log.error("Spilled write unreadable, dropped: %s", what)

    def _next_batch(self) -> list[QueuedWrite]:
        """The priority lane's head if it may go (every data write it depends on is done),
        else the data lane's; consecutive appends and updates (capped) of that lane, written
        as one store.write(), or one put; lock held. A step queues its RUNNING version and
        its lease back to back: they land in one round trip."""
        ready = [op for op in self.q.prio if self.q.order.ready(op, self.q.done_seq)]
        if ready or not self.q.ops:
            # Priority writes that may go, in order; one whose dependencies have not landed
            # waits without holding up the others. (None ready and no data write in memory:
            # what it waits for was lost from the spill; send it rather than wait forever.)
            lane = ready or [self.q.prio[0]]
            until = None
        else:
            lane = list(self.q.ops) if len(self.q.ops) <= _BATCH_NODES else \
                [self.q.ops[i] for i in range(_BATCH_NODES)]
            # A data write made after a pending priority write may depend on it (a lease
            # released after it was renewed): the data lane stops short of it until it
            # lands. The head itself is always older than a waiting priority write (that
            # write waits for an earlier data write, which is at or behind the head).
            until = self.q.prio[0].seq if self.q.prio else None
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

    def _attempt(self, batch: list[QueuedWrite]) -> float:
        """One try at writing `batch`; returns how long to back off before the next (s)."""
        fenced: Fenced | None = None
        try:
            if self._unsure and self._unsure[0] is batch[0] and self._landed(self._unsure):
                # The failed attempt did reach the store (its reply was lost): resending
                # would append every version of it a second time.
                self.q.metrics.incr("checkpoint_found_after_error", len(self._unsure))
                batch, self._unsure = self._unsure, []
            else:
                self._unsure = []
                self.q.states.encode_batch(batch)
                self.q.health.attempt_started = time.monotonic()
                fenced = self._apply(batch)
        except Exception as exc:
            self.q.health.attempt_started = 0.0
            return self._failed(batch, exc)
        self.q.health.attempt_started = 0.0
        self.q.health.succeeded()
        self.q.written(batch, fenced=fenced)
        return 0.0

    def _failed(self, batch: list[QueuedWrite], exc: Exception) -> float:
        """Book a failed attempt at `batch`; returns how long to back off (s)."""
        if isinstance(exc, RecordRefusedError):
            return self._refused(batch, exc)
        if any(op.kind == "append" for op in batch) and not self._unsure:
            self._unsure = batch
        backoff = self.q.health.failed(exc, self.q.pending, self.q.spill.unread)
        self.q.metrics.incr("checkpoint_store_errors")
        # Connection trouble is retried for ever. Anything else may be one bad record
        # (or a store bug): isolate it, then drop it after a few tries rather than
        # wedge every later write behind it.
        if not isinstance(exc, _RETRY_FOREVER):
            if len(batch) > 1:
                with self.q.lock:
                    self._solo_until = max(op.seq for op in batch)
                return 0.0
            if self.q.health.head_failed(batch[0].seq) >= _REJECT_AFTER:
                self._reject(batch[0], exc)
                return 0.0
        self.q.metrics.incr("checkpoint_retries")
        return backoff

    def _refused(self, batch: list[QueuedWrite], exc: RecordRefusedError) -> float:
        """The store refused a record for its content: never retried as it is. A batch is
        sent one write at a time to find the record; that record is sanitised and sent
        once more, and set aside if it is refused again. (The transaction rolled back:
        nothing of it landed, so no read-back.)"""
        self._unsure = []
        self.q.metrics.incr("checkpoint_store_errors")
        if len(batch) > 1:
            with self.q.lock:
                self._solo_until = max(op.seq for op in batch)
            return 0.0
        op = batch[0]
        if self._sanitised is not op:
            self._sanitised = op
            if sanitise_write(op):
                self.q.metrics.incr("checkpoint_sanitised")
                log.warning("Store %s refused a write of execution %s (%s); sent again with "
                            "its free text escaped", self.q.store.url, op.execution_id, exc)
                return 0.0
        self._reject(op, exc, dropped=False)
        return 0.0

    def _landed(self, batch: list[QueuedWrite]) -> bool:
        """Did a write that raised land anyway? A batch is atomic, so its last node's
        latest version tells. (An identical earlier version would fool this; the cost is
        one identical version not stored twice.)"""
        last = [op.node for op in batch if op.node is not None][-1]
        return self.q.store.get_node(last.id) == last

    def _apply(self, batch: list[QueuedWrite]) -> Fenced | None:
        """Write `batch`; what the store refused for its fence (None for a put)."""
        head = batch[0]
        fenced = None
        if head.kind == "put":
            self.q.store.put_execution(cast(Execution, head.execution))
        else:
            fenced = self.q.store.write(*batch_writes(batch))
        self.q.metrics.incr("checkpoint_batches")
        self.q.metrics.observe("checkpoint_batch_ops", len(batch))
        return fenced if isinstance(fenced, Fenced) else None

    def _reject(self, op: QueuedWrite, exc: Exception, *, dropped: bool = True) -> None:
        what = f"node {op.node.id}" if op.node is not None else "an execution write"
        if dropped:
            log.error("Store %s refused %s of execution %s %d times (%s: %s); dropping it",
                      self.q.store.url, what, op.execution_id, _REJECT_AFTER,
                      type(exc).__name__, exc)
            self.q.metrics.incr("checkpoint_dropped")
        else:
            self._set_aside(op, exc, what)
        self.q.metrics.incr("checkpoint_rejected")
        self.q.written([op], rejected=True)

    def _set_aside(self, op: QueuedWrite, exc: Exception, what: str) -> None:
        """Keep a write refused for its content in the store's rejected-records area, or,
        for a store without one (or failing to keep it), in the log as escaped JSON."""
        record = set_aside_text(op)
        node_id = op.node.id if op.node is not None else None
        if isinstance(self.q.store, SetsAside):
            try:
                self.q.store.set_aside(op.kind, op.execution_id, node_id, record.encode(),
                                       str(exc))
            except StoreError as aside_exc:
                log.error("Store %s refused %s of execution %s for its content (%s) and could "
                          "not set it aside (%s): %s", self.q.store.url, what, op.execution_id,
                          exc, aside_exc, record)
                return
            log.error("Store %s refused %s of execution %s for its content, sanitised or not "
                      "(%s); set aside (`livingai-tasks rejected`)", self.q.store.url, what,
                      op.execution_id, exc)
            return
        log.error("Store %s refused %s of execution %s for its content, sanitised or not (%s); "
                  "the store has no rejected-records area, the write was: %s",
                  self.q.store.url, what, op.execution_id, exc, record)
