"""A lock that a waiter takes only once it runs again, never while it sleeps.

`threading.Lock` hands itself to a blocked waiter the moment the holder lets go, but the
waiter is asleep: it must win the GIL back before it can run on and let go in turn. When
dozens of threads are busy in one process (agents saving back to back) winning the GIL
takes tens of milliseconds, and every thread that wants the lock meanwhile queues behind
the sleeper: a lock convoy. Measured with 50 agent threads saving back to back on one
engine: a median hold of 13-36 ms with plain locks on the engine's queue, hot cache and
metrics, about 0.1 ms with this one (loadtest/README.md, "Why the misses").

Here a release only wakes one waiter; the lock stays free, and the waiter takes it when it
runs, unless a running thread took it first (then it waits again). So the lock is only ever
held by a thread that runs. Polling (sleep, try again) avoids the convoy too, and measured
the same, but a poller wakes every fraction of a millisecond for as long as it waits, and
each wake-up takes the GIL from a thread with work to do; a waiter here sleeps until a
release wakes it.

A thread that must not wait at all can `defer()` its critical section instead: it runs at
once if the lock is free, else in the thread holding the lock, before that one lets go. A
holder preempted while it holds the lock then delays that work, not the thread that asked
for it (with 50 agent threads saving back to back, nearly every save held past 50 ms had
waited for the queue's lock, measured; loadtest/README.md).
"""

from __future__ import annotations

import _thread
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import suppress
from typing import Any, cast

__all__ = ["NoConvoyLock"]

log = logging.getLogger("livingai_tasks.lock")

# A waiter also looks at the lock this often without being woken: it covers a wake-up that
# went to a waiter that had just timed out. Rare, so long; short, 150 waiters would wake
# each other in a storm.
_RECHECK_S = 0.05


class NoConvoyLock:
    """Drop-in for threading.Lock (acquire/release/locked/with; usable by Condition)."""

    __slots__ = ("_lock", "_waiters", "_deferred")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: deque[Any] = deque()  # one private lock per waiting thread
        self._deferred: deque[Callable[[], object]] = deque()  # see defer()

    def acquire(self, blocking: bool = True, timeout: float = -1.0) -> bool:
        taken = self._take(blocking, timeout)
        if taken and self._deferred:
            self._run_deferred()  # work deferred before us comes first
        return taken

    def _take(self, blocking: bool, timeout: float) -> bool:
        if self._lock.acquire(False):
            return True
        if not blocking:
            return False
        deadline = None if timeout < 0 else time.monotonic() + timeout
        waiter = _thread.allocate_lock()
        waiter.acquire()
        try:
            while True:
                if waiter not in self._waiters:  # first round, or a release woke us
                    self._waiters.append(waiter)
                # Again after queueing: a holder that let go before saw nobody to wake.
                if self._lock.acquire(False):
                    return True
                wait = _RECHECK_S
                if deadline is not None:
                    wait = min(wait, deadline - time.monotonic())
                    if wait <= 0:
                        return False
                waiter.acquire(True, wait)
                if self._lock.acquire(False):
                    return True
        finally:
            with suppress(ValueError):  # a release took it off already
                self._waiters.remove(waiter)

    def release(self) -> None:
        while True:
            self._lock.release()
            try:
                waiter = self._waiters.popleft()
            except IndexError:
                pass
            else:
                with suppress(RuntimeError):  # woken twice before it ran: once is enough
                    waiter.release()
            # Deferred after our last look, by a thread that found the lock held (by us):
            # ours to run, unless the lock is taken again, and then its taker runs it.
            if not self._deferred or not self._lock.acquire(False):
                return
            self._run_deferred()

    def defer(self, work: Callable[[], object]) -> None:
        """Run `work` under the lock without waiting for it: now, in this thread, if the
        lock is free; else in the thread that holds it, before it lets go. Deferred work
        runs in the order deferred, before the critical section of whoever takes the lock
        next, so a later `with lock:` of the same thread sees its effects. `work` must be
        short, must not take this lock, and must not raise (an exception is logged)."""
        self._deferred.append(work)
        # After queueing it: a holder that let go before we queued saw nothing to run.
        if self._lock.acquire(False):
            self._run_deferred()
            self.release()

    def _run_deferred(self) -> None:
        """Run every deferred piece of work; called with the lock held."""
        while True:
            try:
                work = self._deferred.popleft()
            except IndexError:
                return
            try:
                work()
            except Exception:  # noqa: BLE001 - it ran for another thread, which has moved on
                log.exception("livingai_tasks: work deferred to a lock holder failed")

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    def condition(self) -> threading.Condition:
        """A Condition on this lock. threading.Condition takes any lock with acquire() and
        release() (it falls back to them for what only Lock and RLock have); typeshed
        names only those two, hence the cast."""
        return threading.Condition(cast(Any, self))
