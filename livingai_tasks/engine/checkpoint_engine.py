"""CheckpointEngine: the facade callers use, in front of this process's write-behind queue.

save() validates in the caller's thread (a bad record is refused before anything is
queued), hands the write to this process's WriteBehind (which puts it in the hot cache, in
order) and waits for it as the Budget allows: `durable_wait_ms`, never past `budget_ms`.
Reads serve this process's own newest versions (the queue, then the hot cache) before the
store's, which may be behind.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any, cast

from ..codec import Codec, decode
from ..errors import (
    CodecError,
    ConfigError,
    LivingAIError,
    RecordError,
    StateTooLargeError,
    StoreUnavailableError,
)
from ..metrics import Metrics
from ..metrics_catalogue import declare_catalogue
from ..nodes import Execution, ExecutionNode, dumps_json
from ..settings import (
    Settings,
    check_durable_wait,
    check_number,
    check_queue_full,
    check_spill_dir,
    parse_codec,
)
from ..stores._common import checked_changes
from ..stores.base import AppendsIfNew, Store
from .budget import DURABLE, Budget, ms_since
from .compression import encode_node
from .entry import enter
from .hot_cache import HotCache, count_evictions
from .queued_write import QueuedWrite
from .results import OUTCOMES, SaveResult, WriteResult, write_result
from .spill import spill_waiting
from .write_behind import DROPPED, WriteBehind

__all__ = ["CheckpointEngine", "SaveResult", "WriteResult", "OUTCOMES"]

log = logging.getLogger("livingai_tasks.engine")

# Settings holds the defaults; the engine's keywords read them from there.
_DEFAULT_CODEC = parse_codec(Settings.codec)


_engines: weakref.WeakSet[CheckpointEngine] = weakref.WeakSet()


class CheckpointEngine:
    """Budgeted, ordered, write-behind checkpointing of ExecutionNodes into a Store.

    Thread-safe. One writer thread (and its encoder thread) per process, started on the
    first write and again in a forked child (the parent's queue stays the parent's). An
    atexit hook flushes for up to 5 s on a normal interpreter exit; call close() in a
    worker's shutdown hook to be sure.
    The engine never closes the store: its owner does.
    Defaults of the keywords shared with Settings are Settings' own, and they are checked
    the same way (ConfigError naming the setting and what is accepted).
    """

    def __init__(
        self,
        store: Store,
        *,
        budget_ms: float = Settings.budget_ms,
        codec: Codec = _DEFAULT_CODEC,
        cache_entries: int = 1024,
        cache_bytes: int = 256 * 2**20,
        cache_ttl_s: float = 3600.0,
        queue_max: int = Settings.queue_max,
        queue_full: str = Settings.queue_full,
        spill_dir: str = Settings.spill_dir,
        max_state_bytes: int = Settings.max_state_bytes,
        sync_timeout_s: float = 10.0,
        durable_wait_ms: float | None = Settings.durable_wait_ms,
        unencoded_max_bytes: int = Settings.unencoded_max_bytes,
        metrics: Metrics | None = None,
    ) -> None:
        if not isinstance(store, Store):
            raise ConfigError(f"store must implement livingai_tasks.Store (append, get_node, "
                              f"..., url), got {type(store).__name__}.")
        check_number("budget_ms", budget_ms, low=0.0)
        check_number("cache_ttl_s", cache_ttl_s, low=0.0)
        check_number("sync_timeout_s", sync_timeout_s, low=0.0)
        if durable_wait_ms is not None:
            check_durable_wait(durable_wait_ms, budget_ms)
        for name, value in (("cache_entries", cache_entries), ("cache_bytes", cache_bytes),
                            ("queue_max", queue_max), ("max_state_bytes", max_state_bytes),
                            ("unencoded_max_bytes", unencoded_max_bytes)):
            check_number(name, value, low=0, whole=True)
        check_queue_full(queue_full)
        check_spill_dir(spill_dir)
        self._codec = parse_codec(codec)
        self.store = store
        self._appends_if_new = isinstance(store, AppendsIfNew)  # once: ~10 us per step else
        self.metrics = metrics if metrics is not None else Metrics()
        self._budget = Budget(self.metrics, budget_ms=budget_ms, durable_wait_ms=durable_wait_ms,
                              sync_timeout_s=sync_timeout_s)
        self._queue_max = queue_max
        self._queue_full = queue_full
        self._spill_dir = spill_dir
        self._max_state_bytes = max_state_bytes
        self._unencoded_max_bytes = unencoded_max_bytes
        self._cache = HotCache(max_entries=cache_entries, max_bytes=cache_bytes, ttl_s=cache_ttl_s)
        self._wb: WriteBehind | None = None
        self._wb_lock = threading.Lock()
        # Every catalogued series described and its counters zeroed from the start, so that
        # rate() and alerts see them before the first event.
        declare_catalogue(self.metrics)
        # Read when the metrics are read, not set on every save: fewer lock round trips on
        # the hot path, where 50 agent threads would queue behind the metrics' lock.
        me = weakref.ref(self)
        for name, read in _GAUGES.items():
            self.metrics.gauge_from(name, _gauge(me, read))
        _engines.add(self)

    @classmethod
    def from_settings(cls, store: Store, settings: Settings, *,
                      metrics: Metrics | None = None) -> CheckpointEngine:
        """An engine on `store` with the engine's part of `settings` (budget_ms,
        durable_wait_ms, codec, queue_max, queue_full, spill_dir, max_state_bytes,
        unencoded_max_bytes); its other keywords keep their defaults."""
        return cls(store, budget_ms=settings.budget_ms, durable_wait_ms=settings.durable_wait_ms,
                   codec=parse_codec(settings.codec), queue_max=settings.queue_max,
                   queue_full=settings.queue_full, spill_dir=settings.spill_dir,
                   max_state_bytes=settings.max_state_bytes,
                   unencoded_max_bytes=settings.unencoded_max_bytes, metrics=metrics)

    # -- writes ---------------------------------------------------------------------------
    def save(
        self, node: ExecutionNode, state: bytes | None = None, *, durable: bool = False,
        wait: bool = True, priority: bool = False,
    ) -> SaveResult:
        """Record a new version of `node`, with `state` (raw bytes) encoded as its checkpoint.

        Returns once the store has it, or after waiting `durable_wait_ms` for it (2 ms by
        default; None: up to the budget), and never later than `budget_ms` after the call;
        at once if other writes are queued ahead of it (the writer is busy) or another thread
        holds the queue's lock (that thread queues this write before it lets go). An unfinished
        write stays queued and the writer retries it. The writer thread
        encodes the state, unless `unencoded_max_bytes` of states already wait for it.
        With `state=None` the node's own `checkpoint` field is saved as given.
        `durable=True` waits up to `sync_timeout_s` instead, else raises NotDurableError
        (the write stays queued); `wait=False` queues it and returns without waiting.
        `priority=True` (a non-idempotent tool's start): the writer sends it before the data
        writes queued ahead of it, except those it depends on (earlier versions of the same
        node, a spilled write of its execution), so a slow data write cannot delay it.
        The result's `outcome` says what became of it: durable, queued, spilled (the memory
        queue was full: it waits on local disk, see `queue_full`) or dropped.
        Raises, before anything is queued: CodecError (state not bytes), StateTooLargeError,
        NotJSONSerializableError (input/output/metadata), RecordError (not a node).
        """
        start = time.perf_counter()
        if not isinstance(node, ExecutionNode):
            raise RecordError(f"save() takes an ExecutionNode, got {type(node).__name__}.")
        if state is not None:
            if not isinstance(state, (bytes, bytearray, memoryview)):
                raise CodecError(
                    f"State of node {node.id} must be bytes, got {type(state).__name__}. "
                    "Encode it first, e.g. json.dumps(state).encode()."
                )
            size = memoryview(state).nbytes
            if size > self._max_state_bytes:
                raise StateTooLargeError(
                    f"state of node {node.id} is {size} bytes; the limit is "
                    f"{self._max_state_bytes} (max_state_bytes / LIVINGAI_MAX_STATE_BYTES)"
                )
        json_size = len(node.to_json())
        raw: bytes | None = None
        if state is not None:
            raw = bytes(state)  # a copy of a bytearray: the caller may reuse its buffer
            wb = self._current_writes()
            if wb is not None and not priority and wb.will_spill():
                # A spilled write is stored compressed, and not by the writer: it is busy.
                node, raw = encode_node(node, raw, self._codec, self.metrics), None
            elif wb is not None and wb.states.bytes + len(raw) > self._unencoded_max_bytes:
                # The writer is behind: help it.
                node, raw = encode_node(node, raw, self._codec, self.metrics), None
                self.metrics.incr("checkpoint_caller_encodes")
            else:
                node = node.evolve(checkpoint=None)
        blob_size = len(node.checkpoint) if node.checkpoint is not None else len(raw or b"")
        op = QueuedWrite("append", node.execution_id, json_size + blob_size, node=node, state=raw)
        op.json_size = json_size
        op.priority = priority
        outcome = self._budget.submit_and_wait(self._writes(), op, start, durable=durable,
                                               wait=wait, what=f"Node {node.id}",
                                               count="checkpoint_saves")
        return SaveResult(cast(ExecutionNode, op.node), outcome == DURABLE, ms_since(start),
                          outcome != DROPPED, outcome == DROPPED, outcome)

    def update_execution(
        self, execution_id: str, *, durable: bool = False, wait: bool = True,
        priority: bool = False, **changes: Any
    ) -> WriteResult:
        """Queue a change of an execution's summary (fields: stores.EXECUTION_FIELDS);
        same budget, ordering, durable=True and priority semantics as save() (a lease
        renewal: priority=True; it waits only for earlier writes of the same fields of
        this execution, or for its spilled writes). `updated_at` is the time of this call
        unless given. ConfigError for an unknown field or bad status."""
        start = time.perf_counter()
        try:
            changes = checked_changes(changes)
        except LivingAIError:
            raise
        except ValueError as exc:
            raise ConfigError(f"update_execution({execution_id!r}): {exc}") from None
        size = len(dumps_json(changes.get("metadata"), what=f"Execution {execution_id} metadata"))
        op = QueuedWrite("update", execution_id, size + 256, changes=changes, priority=priority)
        outcome = self._budget.submit_and_wait(
            self._writes(), op, start, durable=durable, wait=wait,
            what=f"Execution {execution_id}", count="checkpoint_execution_writes")
        return write_result(outcome, start)

    def can_append_if_new(self, node_id: str) -> bool:
        """Whether append_if_new() may be used for this node: the store offers it and this
        process has no version of the node still queued (the store's answer would miss it)."""
        return self._appends_if_new and self.queued_version(node_id) is None

    def queued_version(self, node_id: str) -> ExecutionNode | None:  # the store lacks it yet
        return self._queued(node_id)[0]

    def append_if_new(self, node: ExecutionNode, **execution_changes: Any) -> ExecutionNode | None:
        """A step's entry check and its first record in one synchronous store call (stores
        with `append_if_new`: Redis): if the store has no version of `node`, write it and its
        execution's changes, and return None; else return the store's latest version. Not
        budgeted: a store error propagates (the write may have landed: read it back)."""
        changes = checked_changes(execution_changes) if execution_changes else {}
        if not self._appends_if_new:
            raise ConfigError(f"store {self.store.url} has no append_if_new(); check "
                              "can_append_if_new() first.")
        # What this process's writer gathered goes along where the store allows (entry.py).
        existing = enter(cast(AppendsIfNew, self.store), self._current_writes(), node, changes)
        if existing is None:
            self.metrics.incr("checkpoint_saves")
            self.metrics.incr("checkpoint_ops_written")
            count_evictions(self.metrics, self._cache.put(node, len(node.to_json())))
        return existing

    def put_execution(self, execution: Execution, *, durable: bool = False) -> WriteResult:
        """Queue an insert-or-replace of an execution; semantics as update_execution()."""
        start = time.perf_counter()
        op = QueuedWrite("put", execution.id, len(execution.to_json()), execution=execution)
        outcome = self._budget.submit_and_wait(
            self._writes(), op, start, durable=durable, wait=True,
            what=f"Execution {execution.id}", count="checkpoint_execution_writes")
        return write_result(outcome, start)

    def create_execution(self, execution: Execution) -> bool:
        """Insert the execution if absent, synchronously (the caller needs the answer): True
        if inserted. Not queued, so not ordered after queued writes. Store errors propagate."""
        return self.store.create_execution(execution)

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until every write queued so far (in this process, spilled ones included) is
        durable or dropped; restarts a writer thread that died. True if none is left
        pending, False after `timeout_s` seconds. An engine that has not written yet starts
        its writer here if spill files of its store wait in spill_dir (a previous process's):
        a restarted worker calls flush() to send them without waiting for its first save."""
        wb = self._current_writes()
        if wb is None and spill_waiting(self._spill_dir, self.store.url):
            wb = self._writes()
        return True if wb is None else wb.flush(timeout_s)

    def lost(self, node_id: str) -> bool:
        """Whether the store refused a version of this node for its fence (in this
        process): its step was taken over by another attempt."""
        wb = self._current_writes()
        return wb is not None and node_id in wb.fenced_out.nodes

    @property
    def pending(self) -> int:
        """Writes queued in this process (in memory or spilled) and not yet durable."""
        wb = self._current_writes()
        return 0 if wb is None else wb.pending

    def close(self, timeout_s: float = 5.0) -> None:
        """Flush for up to `timeout_s` seconds, then stop the writer. Writes still pending
        are spilled to disk (under queue_full="drop": dropped, counted), and logged with
        the store's last error; the next engine on the same store URL and spill_dir sends
        them. A later write starts a new writer."""
        deadline = time.monotonic() + timeout_s
        wb = self._current_writes()
        if wb is None:
            return
        wb.flush(timeout_s)
        with self._wb_lock:
            if self._wb is wb:
                self._wb = None
        wb.close(deadline)

    # -- reads ----------------------------------------------------------------------------
    def get_node(self, node_id: str) -> ExecutionNode | None:
        """Latest version of a node (blob included): this process's own newest version
        from the hot cache or the queue, else the store's. Store errors propagate."""
        node, state = self._queued(node_id)
        if node is not None and state is not None:
            self.metrics.incr("checkpoint_hot_hits")
            # Not encoded by the writer yet: here, then.
            return encode_node(node, state, self._codec, self.metrics)
        node = node or self._cache.get(node_id)
        if node is not None:
            self.metrics.incr("checkpoint_hot_hits")
            return node
        # Cold reads are not cached: a read racing a newer queued save could pin an old version.
        self.metrics.incr("checkpoint_cold_reads")
        return self.store.get_node(node_id)

    def load(self, node_id: str) -> tuple[ExecutionNode, bytes | None] | None:
        """get_node() plus its decoded state (None if it has no checkpoint). CodecError,
        naming the node, if the blob is corrupt."""
        node, state = self._queued(node_id)
        if node is not None and state is not None:
            self.metrics.incr("checkpoint_hot_hits")
            return node, state
        node = self.get_node(node_id)
        return None if node is None else (node, _decoded(node))

    def latest(self, execution_id: str) -> tuple[ExecutionNode, bytes | None] | None:
        """The execution's latest checkpoint-bearing node and its decoded state.

        A checkpoint this process has queued but not yet written wins; otherwise the store
        answers (another process may have written a newer one). If the store is
        unreachable, the hot cache answers; if it has nothing, StoreUnavailableError.
        """
        wb = self._current_writes()
        node, state = (None, None) if wb is None else wb.queued_checkpoint(execution_id)
        if node is not None:
            self.metrics.incr("checkpoint_hot_hits")
            if state is not None:
                return node, state
        else:
            try:
                self.metrics.incr("checkpoint_cold_reads")
                node = self.store.latest_checkpoint(execution_id)
            except StoreUnavailableError as exc:
                node = self._cache.latest_checkpoint(execution_id)
                if node is None:
                    raise
                self.metrics.incr("checkpoint_hot_hits")
                log.warning("Store %s unreachable (%s); serving execution %s's checkpoint "
                            "from the hot cache", self.store.url, exc, execution_id)
        return None if node is None else (node, _decoded(node))

    def _queued(self, node_id: str) -> tuple[ExecutionNode | None, bytes | None]:
        """This process's newest queued version of a node, and its state if still raw."""
        wb = self._current_writes()
        return (None, None) if wb is None else wb.queued(node_id)

    # -- this process's write-behind queue ------------------------------------------------
    def _writes(self) -> WriteBehind:
        """This process's queue, with its threads running; a new one after fork or close."""
        wb = self._wb
        if wb is not None and wb.pid == os.getpid():
            return wb
        with self._wb_lock:
            wb = self._wb
            if wb is None or wb.pid != os.getpid():
                wb = WriteBehind(self.store, self.metrics, self._cache, codec=self._codec,
                                 queue_max=self._queue_max, queue_full=self._queue_full,
                                 encode_ahead_bytes=self._unencoded_max_bytes // 4,
                                 spill_dir=self._spill_dir)
                wb.start()
                self._wb = wb
            return wb

    def _current_writes(self) -> WriteBehind | None:
        """This process's queue if it has one; never starts one."""
        wb = self._wb
        return wb if wb is not None and wb.pid == os.getpid() else None

    def _after_fork_in_child(self) -> None:
        # The parent's threads do not exist here and its locks may be held by them: start
        # clean. The cache goes too: its versions may never become durable in the parent.
        self._wb = None
        self._wb_lock = threading.Lock()
        self._cache.reset_after_fork()


_GAUGES: dict[str, Callable[[CheckpointEngine], int]] = {
    "checkpoint_queue_depth": lambda engine: engine.pending,
    "checkpoint_cache_entries": lambda engine: engine._cache.entries,
    "checkpoint_cache_bytes": lambda engine: engine._cache.bytes,
    "checkpoint_spill_bytes": lambda engine: (wb.spill.bytes if (
        wb := engine._current_writes()) is not None else 0),
}


def _gauge(ref: weakref.ref[CheckpointEngine],
           read: Callable[[CheckpointEngine], int]) -> Callable[[], float]:
    # Weak: a Metrics shared by engines must not keep them alive.
    def value() -> float:
        engine = ref()
        return 0.0 if engine is None else float(read(engine))
    return value


def _decoded(node: ExecutionNode) -> bytes | None:
    return None if node.checkpoint is None else decode(node.checkpoint, node_id=node.id)


def _reset_in_child() -> None:
    for engine in list(_engines):
        engine._after_fork_in_child()


os.register_at_fork(after_in_child=_reset_in_child)
