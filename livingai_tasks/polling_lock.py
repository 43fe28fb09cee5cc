"""A lock whose waiters poll it with short sleeps instead of blocking on it.

A thread blocked in `threading.Lock.acquire()` owns the lock as soon as the holder lets go,
but it is still asleep: it must win the GIL back before it can run on and release the lock.
When dozens of threads are busy in one process (agents saving back to back) winning the GIL
takes tens of milliseconds, and every other thread that wants the lock queues behind the
sleeper meanwhile: a lock convoy. Measured with 50 agent threads saving back to back on one
engine: a median hold of 13-36 ms with plain locks on the engine's queue, hot cache and
metrics, 0.1 ms with these (loadtest/README.md, "Why the misses").

A poller takes the lock only while it holds the GIL, and releases it before it can lose the
GIL at a blocking call, so the lock is never held by a sleeper. The cost is a few wake-ups
when the lock is held for long, which these locks never are (microseconds per hold).
"""

from __future__ import annotations

import threading
import time
from typing import Any, cast

__all__ = ["PollingLock"]

# The first poll comes soon, the pause then doubles up to a fraction of a millisecond: a
# long wait costs a wake-up every half millisecond at most.
_POLL_FIRST_S = 20e-6
_POLL_MAX_S = 0.5e-3


class PollingLock:
    """Drop-in for threading.Lock (acquire/release/locked/with; usable by Condition)."""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def acquire(self, blocking: bool = True, timeout: float = -1.0) -> bool:
        if self._lock.acquire(False):
            return True
        if not blocking:
            return False
        deadline = None if timeout < 0 else time.monotonic() + timeout
        pause = _POLL_FIRST_S
        while True:
            time.sleep(pause)  # releases the GIL, so the holder gets to run and let go
            if self._lock.acquire(False):
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            pause = min(pause * 2.0, _POLL_MAX_S)

    def release(self) -> None:
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def condition(self) -> threading.Condition:
        """A Condition on this lock. threading.Condition takes any lock with acquire() and
        release() (it falls back to them for what only Lock and RLock have); typeshed
        names only those two, hence the cast."""
        return threading.Condition(cast(Any, self))
