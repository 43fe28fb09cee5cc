"""HotCache: this process's latest version of each node, in memory, bounded and expiring.

The engine serves reads of its own writes from here (and from its write-behind queue), and
falls back to it for an execution's newest checkpoint when the store is unreachable. Its
lock is a NoConvoyLock: dozens of agent threads read and write it at once.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from ..metrics import Metrics
from ..no_convoy_lock import NoConvoyLock
from ..nodes import ExecutionNode

__all__ = ["HotCache", "count_evictions"]


@dataclass(eq=False)
class _Entry:
    latest: ExecutionNode
    latest_size: int
    checkpointed: ExecutionNode | None  # the newest version of this node carrying a blob
    checkpointed_size: int
    expires: float

    @property
    def size(self) -> int:
        extra = self.checkpointed_size if self.checkpointed is not self.latest else 0
        return self.latest_size + extra


class HotCache:
    """Per-process LRU + TTL cache of the latest version of each node, bounded by entries
    and by bytes (blob + JSON + a fixed overhead per version). It also remembers which node
    holds each execution's newest checkpoint, so latest() can answer while the store is
    down. The TTL runs from the last put, not the last read."""

    OVERHEAD = 256  # a rough per-version cost of the object itself

    def __init__(self, *, max_entries: int, max_bytes: int, ttl_s: float,
                 clock: Any = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self._clock = clock
        self._lock = NoConvoyLock()
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._by_execution: dict[str, str] = {}
        self._bytes = 0

    @property
    def entries(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        return self._bytes

    def put(self, node: ExecutionNode, json_size: int) -> int:
        """Make `node` the cached latest version of its id; returns how many were evicted."""
        with self._lock:
            return self._put(node, json_size)

    def _put(self, node: ExecutionNode, json_size: int) -> int:
        size = json_size + len(node.checkpoint or b"") + self.OVERHEAD
        old = self._entries.pop(node.id, None)
        if old is not None:
            self._bytes -= old.size
        if node.checkpoint is not None:
            entry = _Entry(node, size, node, size, 0.0)
        elif old is not None and old.checkpointed is not None:
            entry = _Entry(node, size, old.checkpointed, old.checkpointed_size, 0.0)
        else:
            entry = _Entry(node, size, None, 0, 0.0)
        if entry.size > self.max_bytes:
            # Too big to hold; the old version went too, so it cannot be served stale.
            self._unlink(node.id, node.execution_id)
            return 1
        entry.expires = self._clock() + self.ttl_s
        self._entries[node.id] = entry
        self._bytes += entry.size
        if node.checkpoint is not None:
            self._by_execution[node.execution_id] = node.id
        evicted = 0
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            node_id, gone = self._entries.popitem(last=False)
            self._bytes -= gone.size
            self._unlink(node_id, gone.latest.execution_id)
            evicted += 1
        return evicted

    def fill(self, pending: ExecutionNode, node: ExecutionNode, json_size: int) -> int:
        """`node` is `pending` with its blob, encoded later: it replaces `pending` if that is
        still the cached latest version (a newer one must not be overwritten)."""
        with self._lock:
            entry = self._entries.get(node.id)
            if entry is None or entry.latest is not pending:
                return 0
            return self._put(node, json_size)

    def get(self, node_id: str) -> ExecutionNode | None:
        with self._lock:
            entry = self._live(node_id)
            return None if entry is None else entry.latest

    def latest_checkpoint(self, execution_id: str) -> ExecutionNode | None:
        with self._lock:
            node_id = self._by_execution.get(execution_id)
            entry = None if node_id is None else self._live(node_id)
            return None if entry is None else entry.checkpointed

    def reset_after_fork(self) -> None:
        self._lock = NoConvoyLock()
        self._entries.clear()
        self._by_execution.clear()
        self._bytes = 0

    def _live(self, node_id: str) -> _Entry | None:
        entry = self._entries.get(node_id)
        if entry is None:
            return None
        if self._clock() >= entry.expires:
            del self._entries[node_id]
            self._bytes -= entry.size
            self._unlink(node_id, entry.latest.execution_id)
            return None
        self._entries.move_to_end(node_id)
        return entry

    def _unlink(self, node_id: str, execution_id: str) -> None:
        if self._by_execution.get(execution_id) == node_id:
            del self._by_execution[execution_id]


def count_evictions(metrics: Metrics, evicted: int) -> None:
    """Add what a HotCache call evicted to the counter `checkpoint_cache_evictions`."""
    if evicted:
        metrics.incr("checkpoint_cache_evictions", evicted)
