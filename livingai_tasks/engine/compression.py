"""Compression of queued states, off the caller's thread.

A save queues its state raw; the writer thread compresses it just before it writes it, and
once a quarter of `unencoded_max_bytes` waits, an encoder thread joins in, working ahead of
the writer (oldest first), so that compression goes on while the writer waits for the store
and a backlog gets a second core. On a busy machine a 1 MB encode waits for a CPU for far
longer than any budget, which is why the caller does not do it. (Past `unencoded_max_bytes`
of states waiting, the caller compresses its own: memory stays bounded and a producer faster
than the writer is slowed, never dropped; counter `checkpoint_caller_encodes`.) zstd and
zlib release the GIL while they work, so the agents' threads run meanwhile.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import cast

from ..codec import Codec, encode
from ..metrics import Metrics
from ..no_convoy_lock import NoConvoyLock
from ..nodes import ExecutionNode
from .hot_cache import HotCache, count_evictions
from .queued_write import QueuedWrite

__all__ = ["Compression", "encode_node"]

log = logging.getLogger("livingai_tasks.engine")

# What the encoder thread takes per round: a few states, so that it meets the agents on the
# queue's lock rarely, and leaves the rest to the writer, so that both compress.
_ENCODE_AHEAD_BYTES = 1 << 20


def encode_node(node: ExecutionNode, state: bytes, codec: Codec, metrics: Metrics) -> ExecutionNode:
    """`node` carrying `state` compressed as its checkpoint; the time taken goes to the
    histogram `checkpoint_encode_ms`."""
    start = time.perf_counter()
    encoded = node.evolve(checkpoint=encode(state, codec))
    metrics.observe("checkpoint_encode_ms", (time.perf_counter() - start) * 1000.0)
    return encoded


class Compression:
    """The raw states of one write-behind queue and the encoder thread that compresses them.

    Shares the queue's lock: a state is raw, claimed (someone is compressing it) or swapped
    for its compressed version, and the writer, the encoder and the callers must agree on
    which. Methods marked "lock held" are called with that lock held."""

    def __init__(self, lock: NoConvoyLock, cache: HotCache, metrics: Metrics, codec: Codec, *,
                 ahead_bytes: int, stopping: threading.Event) -> None:
        self._lock = lock
        self._cache = cache
        self._metrics = metrics
        self._codec = codec
        # The encoder thread joins in once this much waits: a writer that keeps up compresses
        # alone, and a burst of small states does not meet one more thread on the lock.
        self._ahead_bytes = ahead_bytes
        self._stopping = stopping
        self._ready = lock.condition()  # enough raw bytes wait for the encoder
        self._encoded = lock.condition()  # the encoder finished a round
        self.raw: deque[QueuedWrite] = deque()  # writes that came with a raw state, oldest first
        self.bytes = 0  # raw states waiting to be compressed
        self.closed = False  # the queue gave up on its writes: nothing left to swap in
        self.thread = self._new_thread()

    def _new_thread(self) -> threading.Thread:
        return threading.Thread(target=self._supervised_run, name="livingai-checkpoint-encoder",
                                daemon=True)

    def start(self) -> None:
        self.thread.start()

    def restart_if_dead(self) -> bool:
        """Start the encoder thread again if it died (its cause was logged); whether it did."""
        if self.thread.ident is None or self.thread.is_alive() or self._stopping.is_set():
            return False
        self.thread = self._new_thread()
        self.thread.start()
        return True

    def _supervised_run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - logged once; the next save restarts it
            log.error("Checkpoint encoder thread died (%s: %s); the writer compresses the "
                      "states meanwhile, and the next save starts it again",
                      type(exc).__name__, exc, exc_info=exc)

    # -- bookkeeping (lock held) ----------------------------------------------------------
    def add(self, op: QueuedWrite) -> None:
        """A write with a raw state joined the queue; lock held."""
        state = cast(bytes, op.state)
        self.bytes += len(state)
        self.raw.append(op)
        if self.bytes >= self._ahead_bytes:
            self._ready.notify()

    def written(self, op: QueuedWrite) -> None:
        """`op` left the queue (durable or rejected); lock held."""
        self.bytes -= len(op.state or b"")
        op.state = None  # the encoder must not count it out a second time

    def trim(self) -> None:
        """Forget the oldest writes that are not raw any more (written or encoded); lock held."""
        while self.raw and self.raw[0].state is None:
            self.raw.popleft()

    def stop(self) -> None:
        """Wake the encoder so it sees the queue's stopping event; lock held."""
        self._ready.notify_all()

    def clear(self) -> None:
        """The queue dropped every write; lock held."""
        self.raw.clear()
        self.bytes = 0
        self.closed = True

    # -- the writer's side ----------------------------------------------------------------
    def encode_batch(self, batch: list[QueuedWrite]) -> None:
        """Compress the states of `batch` still raw: here those the encoder thread has not
        taken, then wait for those it has."""
        while True:
            with self._lock:
                mine = [op for op in batch if op.state is not None and not op.claimed]
                for op in mine:
                    op.claimed = True
                if not mine:
                    theirs = [op for op in batch if op.state is not None]  # all claimed
                    if not theirs:
                        return
                    if not self.thread.is_alive():
                        for op in theirs:  # nobody is left to finish them
                            op.claimed = False
                    else:
                        self._encoded.wait(0.5)
                    continue
            done: list[tuple[QueuedWrite, ExecutionNode, ExecutionNode]] = []
            try:
                for op in mine:
                    pending = cast(ExecutionNode, op.node)
                    done.append((op, pending, encode_node(pending, cast(bytes, op.state),
                                                          self._codec, self._metrics)))
            except BaseException:
                with self._lock:
                    for op in mine:
                        op.claimed = False
                raise
            evicted = 0
            with self._lock:  # once per batch: agents' saves queue on this lock
                for op, pending, encoded in done:
                    evicted += self._swap(op, pending, encoded)
            count_evictions(self._metrics, evicted)

    # -- the encoder thread ---------------------------------------------------------------
    def _run(self) -> None:
        """Compress queued states ahead of the writer, oldest first."""
        while True:
            with self._lock:
                ops = self._claim_ahead()
                while not ops and not self._stopping.is_set():
                    self._ready.wait()
                    ops = self._claim_ahead()
                if not ops:
                    return
                jobs = [(op, cast(ExecutionNode, op.node), cast(bytes, op.state)) for op in ops]
            done: list[tuple[QueuedWrite, ExecutionNode, ExecutionNode]] = []
            try:
                for op, pending, state in jobs:
                    try:
                        done.append((op, pending, encode_node(pending, state, self._codec,
                                                              self._metrics)))
                    except Exception:  # noqa: BLE001 - the writer meets the same error
                        log.exception("Checkpoint encoder: could not compress node %s; the "
                                      "writer will retry it", pending.id)
            except BaseException:
                with self._lock:  # dying: the writer must not wait for these
                    for op, _, _ in jobs:
                        op.claimed = False
                    self._encoded.notify_all()
                raise
            evicted = 0
            with self._lock:  # once per round, like the writer: agents' saves queue on this lock
                for op, pending, encoded in done:
                    evicted += self._swap(op, pending, encoded)
                for op, _, _ in jobs:
                    op.claimed = False  # done, or failed: then the writer takes it
                self._encoded.notify_all()
            count_evictions(self._metrics, evicted)

    def _claim_ahead(self) -> list[QueuedWrite]:
        """While a backlog of at least `ahead_bytes` waits: the oldest writes whose states
        nobody is compressing yet, up to _ENCODE_AHEAD_BYTES (at least one), claimed; lock
        held. Taken a few at a time, so that the encoder meets the agents on the lock rarely."""
        ops: list[QueuedWrite] = []
        size = 0
        if self.bytes < self._ahead_bytes:
            return ops
        while self.raw and (not ops or size + len(self.raw[0].state or b"") <= _ENCODE_AHEAD_BYTES):
            op = self.raw.popleft()
            if op.state is not None and not op.claimed:
                op.claimed = True
                ops.append(op)
                size += len(op.state)
        return ops

    def _swap(self, op: QueuedWrite, pending: ExecutionNode, encoded: ExecutionNode) -> int:
        """Put the compressed version in place of the raw state; lock held. Returns the
        cache evictions."""
        if op.state is None or self.closed:  # written off meanwhile (rejected, or closed)
            return 0
        self.bytes -= len(op.state)
        op.node, op.state = encoded, None
        # Unless a newer version was cached meanwhile, the cache gets the blob too.
        return self._cache.fill(pending, encoded, op.json_size)
