"""StoreHealth: what the writer knows of its store's trouble, and how it says so.

The streak of failed attempts and the backoff it earns, the last error (shown by every
message about a write that is late, spilled or lost: when no call has failed yet, how long
the call under way has waited), the failures of one head write (a record the store keeps
refusing is dropped after a few, not retried for ever), and log lines rate-limited so that
an outage with a full queue does not turn every save into a line.
"""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["StoreHealth", "LOG_EVERY_S", "note_failure", "last_failure"]

log = logging.getLogger("livingai_tasks.engine")

LOG_EVERY_S = 30.0
_BACKOFF_FIRST_S = 0.05
_BACKOFF_MAX_S = 1.0  # short: once the store is back, queued writes should land promptly


_last_failure = 0.0  # time.monotonic() of the last store call this process saw fail


def note_failure() -> None:
    """A store call failed in this process (a write, a step's entry check). Recovery reads
    it: through an outage no worker could renew its liveness (see recover_once)."""
    global _last_failure
    _last_failure = time.monotonic()


def last_failure() -> float:
    """time.monotonic() of the last store call this process saw fail, 0.0 if none."""
    return _last_failure


class StoreHealth:
    """Failure bookkeeping of one writer (its thread only, except `note` and the reads)."""

    def __init__(self, store_url: str) -> None:
        self.store_url = store_url
        self.last_error = ""
        self.failures = 0  # consecutive failed attempts (reset by a success)
        self.attempt_started = 0.0  # time.monotonic() of the store call under way, or 0
        self._first_failure = self._last_log = 0.0
        self._head_seq = self._head_failures = 0
        self._note_lock = threading.Lock()
        self._noted_at: dict[str, float] = {}
        self._unnoted: dict[str, int] = {}

    def error(self) -> str:
        """The store's last error, or what the writer is waiting for."""
        if self.last_error:
            return self.last_error
        started = self.attempt_started
        if started:
            return (f"no store call has failed yet: the writer's call has waited "
                    f"{time.monotonic() - started:.1f} s for the store")
        return "no store call has failed yet"

    def failed(self, exc: BaseException, pending: int, spilled: int) -> float:
        """Book a failed attempt; the backoff it earns (s)."""
        now = time.monotonic()
        note_failure()
        self.failures += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.failures == 1:
            self._first_failure = self._last_log = now
            log.warning("Store %s failed a write (%s); %d writes queued, retrying",
                        self.store_url, self.last_error, pending)
        elif now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log.warning("Store %s still failing after %.0f s and %d attempts (%s); "
                        "%d writes queued (%d spilled)", self.store_url,
                        now - self._first_failure, self.failures, self.last_error, pending,
                        spilled)
        return min(_BACKOFF_FIRST_S * 2.0 ** (self.failures - 1), _BACKOFF_MAX_S)

    def succeeded(self) -> None:
        if self.failures:
            log.info("Store %s took writes again after %d failed attempts (%.1f s)",
                     self.store_url, self.failures, time.monotonic() - self._first_failure)
            self.failures = 0

    def head_failed(self, seq: int) -> int:
        """One more refusal of the write `seq` sent alone; how many in a row."""
        self._head_failures = self._head_failures + 1 if self._head_seq == seq else 1
        self._head_seq = seq
        return self._head_failures

    def note(self, what: str, message: str, *args: object) -> None:
        """Log `message` % (count, *args) for an event of kind `what` ("dropped",
        "spilled"), at most once per LOG_EVERY_S, with the count of events since."""
        with self._note_lock:
            self._unnoted[what] = self._unnoted.get(what, 0) + 1
            now = time.monotonic()
            if self._noted_at.get(what) and now - self._noted_at[what] < LOG_EVERY_S:
                return
            count, self._unnoted[what], self._noted_at[what] = self._unnoted[what], 0, now
        log.warning(message, count, *args)
