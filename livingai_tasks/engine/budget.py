"""Budget: how long a write call holds its caller, and what it tells the caller after.

A write is queued, then waited for: at most `durable_wait_ms`, never past what is left of
`budget_ms` (a promise about the whole hold, wake-up included), and not at all when other
writes are queued ahead of it (they land first; a sleeper must also win the GIL back to
return, which under a burst of saves is the whole tail of the hold) or when the queue's
lock was held (the holder queues the write before it lets go). durable=True waits up to
`sync_timeout_s` instead and raises NotDurableError if the write is not durable by then.
A spilled write (the memory queue was full) is not waited for: it is behind every write in
memory. The caller learns which of durable, queued, spilled or dropped happened.
"""

from __future__ import annotations

import time

from ..errors import FencedOutError, NotDurableError
from ..metrics import Metrics
from ..stores.base import fence_of
from .queued_write import QueuedWrite
from .write_behind import DEFERRED, DROPPED, QUEUED, SPILLED, WriteBehind

__all__ = ["Budget", "ms_since", "DURABLE"]

DURABLE = "durable"

# A thread woken at its deadline returns late: stop waiting this much early, so that the
# budget holds for the whole hold, wake-up included.
_WAKE_MARGIN_S = 0.001


def ms_since(start: float) -> float:
    """Milliseconds since `start` (time.perf_counter())."""
    return (time.perf_counter() - start) * 1000.0


class Budget:
    """The hold policy of one engine; records every hold in `checkpoint_held_ms`."""

    def __init__(self, metrics: Metrics, *, budget_ms: float, durable_wait_ms: float | None,
                 sync_timeout_s: float) -> None:
        self._metrics = metrics
        self.budget_s = budget_ms / 1000.0
        # How long a save waits for the store before leaving the write to the writer: the
        # agent's hold is then encode + this, not the store's tail latency (a PostgreSQL
        # commit's p99 is tens of ms on a shared disk). None: wait up to the whole budget.
        self.durable_wait_s = self.budget_s if durable_wait_ms is None else durable_wait_ms / 1000.0
        self.sync_timeout_s = sync_timeout_s

    def submit_and_wait(
        self, wb: WriteBehind, op: QueuedWrite, start: float, *, durable: bool, wait: bool,
        what: str, count: str,
    ) -> str:
        """Queue `op` on `wb` and wait; its outcome: "durable", "queued", "spilled" or
        "dropped". Raises NotDurableError for durable=True. wait=False (bookkeeping whose
        loss the lease covers): queue it and return. `what` names the write in errors;
        `count`: the counter of accepted calls of this kind."""
        # Only a durable write needs its place in the queue before it returns: others may
        # leave queueing to the thread holding the queue's lock.
        placed = wb.submit(op, wait_for_lock=durable)
        if placed == DROPPED:
            if durable:
                self._held(start, count, "checkpoint_not_durable")
                raise NotDurableError(f"{what} was dropped: the write-behind queue is full "
                                      f"({wb.queue_max} writes, queue_full='drop'; store "
                                      f"{wb.store.url} is slow or down: "
                                      f"{wb.last_error or 'no error yet'}).")
            self._held(start, count)
            return DROPPED
        outcome = SPILLED if placed == SPILLED else QUEUED
        if not wait and not durable:
            self._held(start, count)
            return outcome
        if placed == DEFERRED:  # deferred to the thread holding the queue's lock: not waited for
            self._held(start, count, "checkpoint_budget_overruns")
            return outcome
        if durable:
            timeout = self.sync_timeout_s
        elif placed == SPILLED:
            timeout = 0.0  # behind every write in memory: it will not be durable in budget
        else:
            spent = time.perf_counter() - start
            timeout = min(self.durable_wait_s, self.budget_s - _WAKE_MARGIN_S - spent)
            if op.queued_behind:  # the writer is busy with older writes: see the docstring
                timeout = 0.0
        if wb.wait(op, timeout):
            self._held(start, count)
            if op.fenced:
                raise _fenced_out(op, what)
            return DURABLE
        if not durable:
            self._held(start, count, "checkpoint_budget_overruns")
            return outcome
        self._held(start, count, "checkpoint_not_durable")
        if wb.was_rejected(op.seq):
            raise NotDurableError(f"{what} was rejected by the store {wb.store.url} "
                                  f"({wb.last_error}) and dropped; see the error log.")
        raise NotDurableError(
            f"{what} is not durable after {self.sync_timeout_s:g} s (store "
            f"{wb.store.url}: {wb.last_error or 'slow'}); the write stays queued"
            f"{' (spilled to disk)' if placed == SPILLED else ''} and lands when the store "
            "answers.", still_queued=True
        )

    def _held(self, start: float, *counters: str) -> None:
        # One acquisition of the metrics' lock per call: with many threads saving, each
        # acquisition is a place to queue behind a thread that waits for the GIL.
        self._metrics.observe("checkpoint_held_ms", ms_since(start), count=counters)


def _fenced_out(op: QueuedWrite, what: str) -> FencedOutError:
    record_fence = fence_of(op.node) if op.node is not None else int(
        op.changes.get("if_fence") or 0)
    return FencedOutError(
        f"{what} was refused by the store: execution {op.execution_id} was taken over under a "
        f"newer fence than this record's ({record_fence})",
        node_id=op.node.id if op.node is not None else "", execution_id=op.execution_id,
        record_fence=record_fence, current_fence=-1)
