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
"""

from __future__ import annotations

import _thread
import threading
import time
from collections import deque
from contextlib import suppress
from typing import Any, cast

__all__ = ["NoConvoyLock"]

# A waiter also looks at the lock this often without being woken: it covers a wake-up that
# went to a waiter that had just timed out. Rare, so long; short, 150 waiters would wake
# each other in a storm.
_RECHECK_S = 0.05


class NoConvoyLock:
    """Drop-in for threading.Lock (acquire/release/locked/with; usable by Condition)."""

    __slots__ = ("_lock", "_waiters")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiters: deque[Any] = deque()  # one private lock per waiting thread

    def acquire(self, blocking: bool = True, timeout: float = -1.0) -> bool:
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
        self._lock.release()
        try:
            waiter = self._waiters.popleft()
        except IndexError:
            return
        with suppress(RuntimeError):  # woken twice before it ran: once is enough
            waiter.release()

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
