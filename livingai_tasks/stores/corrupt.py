"""Corrupt records: the checksum a stored JSON body carries, and how a listing that skips a
corrupt row reports it.

A flipped byte inside a JSON string still parses, so a body edited in place (an `args`
value changed) would be read back as if it were the record; each body therefore carries a
CRC32 of its text, checked on every read. A row written before its store had checksums has
none: it reads unverified (a legacy row is not an error).

A listing (list_executions) leaves a corrupt row out rather than failing for every other
record. It logs the row once per process (the recovery tick lists every few seconds, and
one line per tick forever would bury everything else) and hands it to whoever is
collecting: `with collect_skipped() as skipped: store.list_executions(...)` gives the
recovery tick and `livingai-tasks list`/`stats` the rows they did not see. The collector is
a context variable, so each thread collects only its own listings.
"""

from __future__ import annotations

import logging
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from ..errors import CorruptRecordError

__all__ = ["SkippedRecord", "collect_skipped", "skip_corrupt", "text_crc", "check_text_crc"]

log = logging.getLogger("livingai_tasks.stores")


@dataclass(frozen=True)
class SkippedRecord:
    """A row a listing left out because it is corrupt: its execution id, store key, why."""

    execution_id: str
    key: str
    reason: str


_collector: ContextVar[list[SkippedRecord] | None] = ContextVar("livingai_tasks_skipped",
                                                                default=None)
_logged: set[tuple[str, str]] = set()  # (store url, key) already logged by this process
_logged_lock = threading.Lock()
_LOGGED_MAX = 10_000  # a store full of corrupt rows must not grow this without bound


@contextmanager
def collect_skipped() -> Iterator[list[SkippedRecord]]:
    """Collect the corrupt rows the listings made in this block (this thread) leave out."""
    found: list[SkippedRecord] = []
    token = _collector.set(found)
    try:
        yield found
    finally:
        _collector.reset(token)


def skip_corrupt(store_url: str, exc: CorruptRecordError) -> None:
    """A listing leaves out the row `exc` is about: collect it, and log it once."""
    key = exc.key or str(exc)
    found = _collector.get()
    if found is not None:
        found.append(SkippedRecord(exc.execution_id, key, str(exc)))
    with _logged_lock:
        if (store_url, key) in _logged:
            return
        if len(_logged) >= _LOGGED_MAX:
            _logged.clear()
        _logged.add((store_url, key))
    log.error("Skipping a corrupt record in a listing of %s (logged once per process; "
              "repair or delete it): %s", store_url, exc)


def text_crc(text: str) -> int:
    """The checksum a stored JSON body carries: CRC32 of its UTF-8 text (0 .. 2**32 - 1)."""
    return zlib.crc32(text.encode("utf-8", "surrogatepass"))


def check_text_crc(text: str, stored: int | None) -> str:
    """Why `text` does not match its stored checksum ("" if it does, or if it has none)."""
    if stored is None:
        return ""
    computed = text_crc(text)
    if computed == int(stored):
        return ""
    return f"checksum mismatch (stored {int(stored):#010x}, computed {computed:#010x})"
