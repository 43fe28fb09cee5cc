"""The Store protocol: the durable home of nodes and executions.

Synchronous on purpose: it is called from Celery signal handlers in prefork children and
from the engine's writer thread. A Protocol, not a base class: third-party stores need not
inherit; tests/test_store_conformance.py is the contract.

Connections are opened lazily, on first use, and must not be shared across fork: a store
object built in a parent and used in a child reconnects (each backend checks os.getpid()).

What a third-party store must implement: every method of `Store` below (and a `url`
attribute, password masked). Pass the conformance suite and the engine, recovery and the CLI
work on it.

Optional capabilities, each a Protocol of its own (a store declares one by having its
method; `isinstance(store, AppendsIfNew)` tells whether it does):

- `AppendsIfNew` (RedisStore, MemoryStore): `append_if_new(node, changes)`, a step's entry
  check and its RUNNING record (with its lease) in one round trip, fenced (FencedOutError).
  Where a store has it, the engine uses it; elsewhere a step reads, then queues its write.
- `SetsAside` (SQL, Redis, memory; tiered keeps them in PostgreSQL): `set_aside(...)`
  keeps a record the store refused for its content, opaquely (base64 of its JSON, which
  cannot be refused again), for an operator to list (`rejected()`, `livingai-tasks
  rejected`). Elsewhere the engine logs it at ERROR.
- `SweepsHotTier` (TieredStore): `sweep_hot_tier()`, upkeep the recovery tick runs before it
  plans; it must not raise for an unreachable server.
- `TracksWorkers` (every store here; the tiered store keeps workers in PostgreSQL): one
  liveness record per worker process, with the lease owners of its processes and the
  executions it holds, so that recovery resumes all of them once the worker stops beating.
- `ListsWorkers` (every store here): a liveness record also carries the worker's counters
  (`beat_worker(..., counters=...)`), and `workers()` lists every record, so that
  `livingai-tasks stats` sums a fleet's counters from the store.

Fencing (every store): each execution has a `fence` that only claim() raises; each node
version carries the fence it was made under in metadata[Meta.FENCE] (missing = 0). append()
and write() refuse a version whose fence is lower than its execution's, atomically against a
concurrent claim, and return the refused ids as a `Fenced`; an update whose changes carry
`if_fence` is applied only while the execution's fence is <= it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from ..nodes import Execution, ExecutionNode, ExecutionStatus, Meta

__all__ = ["Store", "AppendsIfNew", "WritesBeforeEntry", "SweepsHotTier", "TracksWorkers",
           "EXECUTION_FIELDS", "IF_FENCE", "Updates", "Fenced", "WorkerRecord", "fence_of",
           "SetsAside", "RejectedRecord", "ListsWorkers", "check_counters", "KeepsSideRecords"]

# The fields update_execution() may change. id and created_at never change; fence only
# through claim(), so that a fencing token can only grow by a successful compare-and-set.
EXECUTION_FIELDS = frozenset(
    {"status", "current_node_id", "lease_owner", "lease_deadline", "attempts", "reason",
     "updated_at", "metadata"}
)

# The reserved key of an update's changes (not a field): apply it only while the execution's
# fence is <= this value. Without it an update applies whatever the fence (recovery, operators).
IF_FENCE = "if_fence"

# write()'s execution changes: (execution id, {field: value}) pairs, applied in order.
Updates = Sequence[tuple[str, dict[str, Any]]]


def fence_of(node: ExecutionNode) -> int:
    """The fence a node version was made under (metadata[Meta.FENCE]; missing = 0)."""
    return int(node.metadata.get(Meta.FENCE) or 0)


@dataclass(frozen=True)
class Fenced:
    """What a write refused because its execution's fence had moved past it: the ids of the
    refused node versions and the execution ids of the refused `if_fence` updates. Falsy
    when nothing was refused."""

    nodes: tuple[str, ...] = ()
    executions: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.nodes or self.executions)


@dataclass(frozen=True)
class WorkerRecord:
    """One worker's liveness record (TracksWorkers): its deadline (epoch seconds), the lease
    owner names of its processes, and the execution ids it holds (running, reserved,
    prefetched)."""

    worker: str
    expires_at: float
    owners: tuple[str, ...] = ()
    holding: tuple[str, ...] = ()
    # The worker's counters summed over its processes (ListsWorkers), as of its last beat.
    counters: dict[str, float] = field(default_factory=dict)


def check_counters(counters: object, worker: str) -> dict[str, float]:
    """`counters` as {name: float} ({} for None); ValueError naming the worker if it holds
    anything else (a store reading a record turns that into a RecordError)."""
    if counters is None:
        return {}
    if not isinstance(counters, Mapping) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
            for k, v in counters.items()):
        raise ValueError(f"counters of worker {worker!r} must map names to numbers, "
                         f"got {counters!r:.200}")
    return {k: float(v) for k, v in counters.items()}


@runtime_checkable
class Store(Protocol):
    """What every store implements (a third-party one too): the methods below and `url`.

    Every store fences: append() and write() refuse node versions made under an older fence
    than their execution's (returning them in a `Fenced`), updates with `if_fence` apply only
    while the fence allows, and claim() is a compare-and-set on the fence and on the lease
    having expired (see each method).

    A store may also offer optional capabilities, each its own Protocol in this module:
    `AppendsIfNew` (append_if_new: a step's entry check and first record in one atomic
    step), `TracksWorkers` (worker liveness records: beat_worker, dead_workers, worker,
    forget_worker) and `SweepsHotTier` (sweep_hot_tier: upkeep of a cache tier, run by the
    recovery tick). Callers test for them with isinstance(store, AppendsIfNew) and fall
    back to the base methods when a store does not offer them.
    """

    url: str  # as given, password masked: safe to log

    # -- nodes: an append-only log of versions -------------------------------------------
    def append(self, nodes: Sequence[ExecutionNode]) -> Fenced:
        """Append one new version of each node, atomically as one batch, in order.

        Never changes an earlier version. Later in the batch wins over earlier for the
        "latest version" of a node. Raises StoreUnavailableError if the server is down.

        Fenced: a node whose fence (fence_of(node)) is lower than its execution's current
        fence is refused, checked atomically with its write against a concurrent claim; the
        rest of the batch is written. A node of an execution that does not exist is
        accepted. Returns the refused node ids (a falsy Fenced when none was).
        """

    def get_node(self, node_id: str) -> ExecutionNode | None:
        """Latest version of a node (checkpoint blob included), or None."""

    def node_versions(self, node_id: str) -> list[ExecutionNode]:
        """Every version of a node kept, oldest first (write() may let a version take the
        place of the one it supersedes)."""

    def nodes(self, execution_id: str) -> list[ExecutionNode]:
        """Latest version of each node of an execution, ordered by (seq, created_at, id)."""

    def latest_checkpoint(self, execution_id: str) -> ExecutionNode | None:
        """The execution's newest checkpoint (blob included), or None: among the node
        versions that carry one, the furthest step's (highest seq), and of that step's the
        last appended. So a write that lands late (re-sent after an outage, or queued in a
        slow worker while the next step ran elsewhere) never makes an earlier step's state
        the latest again."""

    def write(self, nodes: Sequence[ExecutionNode], updates: Updates) -> Fenced:
        """append(nodes), then update_execution(id, **changes) for each update in order,
        as one atomic write (one round trip where the backend allows). The engine's
        writer sends each batch with it: records and execution changes queued together
        (a step's record and its lease, a last step and its COMPLETED) land together.

        Nodes are fenced as in append(); an update whose changes carry `if_fence` is applied
        only if the execution's fence is <= it. Returns what was refused: node ids, and the
        execution ids of refused if_fence updates (an update of a missing execution is a
        no-op, not a refusal). The rest of the batch is written.

        Unlike append(), a node's first version in the batch may take the place of the
        version this store object wrote (or appended-if-new) before it, if that one is
        supersedable (ExecutionNode.is_supersedable) and still the node's latest: an
        idempotent step's outcome then does not store its input a second time. Optional:
        a store may always append (Redis and the SQL stores replace)."""

    # -- executions: one mutable summary row each -----------------------------------------
    def put_execution(self, execution: Execution) -> None:
        """Insert the execution, or replace every field if it exists (fence included)."""

    def create_execution(self, execution: Execution) -> bool:
        """Insert the execution if absent. True if inserted, False if it already existed."""

    def update_execution(self, execution_id: str, **changes: Any) -> bool:
        """Set some fields (names from EXECUTION_FIELDS, else ConfigError). updated_at is
        set to now unless given. A missing execution is a no-op. With `if_fence=f` the
        update applies only if the execution's fence is <= f. Returns whether it applied
        (False for a missing execution or a refused if_fence)."""

    def get_execution(self, execution_id: str) -> Execution | None: ...

    def list_executions(
        self,
        *,
        status: ExecutionStatus | None = None,
        lease_expired_before: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Execution]:
        """Executions, newest created first; with `lease_expired_before` (epoch seconds),
        only those whose lease_deadline is set and < it, oldest deadline first. Served
        from an index (never a scan of nodes or a Redis SCAN). A row that cannot be decoded
        is logged (with its id and store key) and left out: one corrupt record never hides
        the others. get_execution/get_node/nodes/node_versions raise CorruptRecordError
        naming the execution, node and store key instead."""

    def claim(self, execution_id: str, *, fence: int, owner: str, lease_s: float,
              now: float | None = None) -> bool:
        """Compare-and-set on the fence and on the lease having expired: if the stored fence
        equals `fence` AND the lease is free (lease_deadline NULL, as for IN_DOUBT) or
        expired (lease_deadline < now; now defaults to time.time()), set fence to
        fence + 1, lease_owner to `owner`, lease_deadline to now + lease_s, attempts += 1,
        and return True. Otherwise (or if the execution is missing) change nothing and
        return False. One statement or script: a lease renewed between a listing and the
        claim makes the claim fail. Of N concurrent claimers, at most one wins."""

    def migrate(self) -> None:
        """Create or upgrade the schema (an explicit step, never on import or connect).
        Idempotent; a no-op for stores without a schema."""

    def close(self) -> None:
        """Release connections. Idempotent; the data stays, and a later call reconnects."""


@runtime_checkable
class AppendsIfNew(Protocol):
    """Optional: a node's first version written only if it has none, in one atomic step."""

    def append_if_new(self, node: ExecutionNode,
                      changes: dict[str, Any]) -> ExecutionNode | None:
        """If no version of `node` is stored, append it and apply `changes` (update_execution()
        keywords, may be empty) to its execution, both or neither, and return None. Otherwise
        write nothing and return the stored latest version. Of concurrent callers on one node
        exactly one writes. Takes a node without a checkpoint (RecordError otherwise).

        Fenced first: if the node's fence is lower than its execution's, or `changes` carry
        an `if_fence` lower than it, nothing is written and FencedOutError is raised."""


@runtime_checkable
class WritesBeforeEntry(Protocol):
    """Optional, with AppendsIfNew: a write() and then an append_if_new() in one round trip.
    A process's engine holds an idempotent step's outcome for its next step's entry to carry
    (its write and the entry check then cost one round trip instead of two)."""

    def write_then_append_if_new(self, nodes: Sequence[ExecutionNode], updates: Updates,
                                 node: ExecutionNode, changes: dict[str, Any]
                                 ) -> tuple[Fenced, ExecutionNode | None]:
        """write(nodes, updates), then append_if_new(node, changes): both their answers.
        The entry never lands without the write: if the write fails, the entry is not made
        and the call raises; if the entry is fenced out, the write has landed and
        FencedOutError says so (`written` attribute: the write's Fenced)."""


@runtime_checkable
class KeepsSideRecords(Protocol):
    """Optional (every store here): small keyed records an adapter keeps beside executions
    (a framework's own checkpoints), never read by the engine or recovery. A `space` (the
    adapter's name) holds groups (a LangGraph thread); a group maps keys to opaque bytes."""

    def side_get(self, space: str, group: str) -> dict[str, bytes]:
        """Every record of the group ({} if none)."""

    def side_put(self, space: str, group: str, records: Mapping[str, bytes], *,
                 replace: bool = True) -> None:
        """Write the records in one atomic write; with replace=False a key already stored
        keeps its value (insert if absent)."""

    def side_delete(self, space: str, group: str, keys: Sequence[str] | None = None) -> None:
        """Delete these keys of the group, or the whole group (keys=None); missing ones
        are ignored."""

    def side_groups(self, space: str) -> list[str]:
        """The groups of the space that hold at least one record, sorted."""


@runtime_checkable
class TracksWorkers(Protocol):
    """Optional: one liveness record per worker process, renewed by the worker's own timer.

    When a worker stops beating (SIGKILL, a dead host), every execution it held, running or
    only received, can be resumed at once instead of waiting for each step's lease.
    """

    def beat_worker(self, worker: str, *, expires_at: float, owners: Sequence[str],
                    holding: Sequence[str]) -> None:
        """Insert or replace the worker's record: its liveness deadline (epoch seconds), the
        lease owner names of its processes (e.g. "host:pid" of each pool child) and the
        execution ids it holds. One round trip."""

    def dead_workers(self, now: float, limit: int = 100) -> list[WorkerRecord]:
        """Workers whose expires_at < now, oldest deadline first, at most `limit`."""

    def worker(self, worker: str) -> WorkerRecord | None:
        """The worker's record, or None."""

    def forget_worker(self, worker: str) -> None:
        """Delete the worker's record (once what it held is taken care of). Idempotent."""


@runtime_checkable
class ListsWorkers(Protocol):
    """Optional, with TracksWorkers: beat_worker() also takes `counters` ({name: number},
    the worker's counters summed over its processes; None keeps none), stored with the
    record and returned in WorkerRecord.counters; and every record can be listed."""

    def workers(self, limit: int = 1000) -> list[WorkerRecord]:
        """Every worker record, live or expired (not yet forgotten), by worker name, at
        most `limit`."""


@runtime_checkable
class SweepsHotTier(Protocol):
    """Optional: upkeep of a cache tier that may hold stale copies (the tiered store)."""

    def sweep_hot_tier(self) -> int:
        """Delete the cached copies recorded as possibly stale, then their records. Returns
        how many were swept (0 when there were none or a tier could not be reached: they
        wait for the next sweep). Never raises for an unreachable server."""


@dataclass(frozen=True)
class RejectedRecord:
    """A write the store refused for its content, kept for an operator. `payload` is the
    write as JSON (bytes, as it was handed in); `reason` is the store's refusal."""

    kind: str  # the write's kind: "append", "update" or "put"
    execution_id: str
    node_id: str | None
    payload: bytes
    reason: str
    rejected_at: float  # epoch seconds


@runtime_checkable
class SetsAside(Protocol):
    """Optional: a rejected-records area (records refused for their content)."""

    def set_aside(self, kind: str, execution_id: str, node_id: str | None, payload: bytes,
                  reason: str) -> None:
        """Keep the refused record opaquely, so that its content cannot be refused again."""

    def rejected(self, limit: int = 100) -> list[RejectedRecord]:
        """The records set aside, newest first, at most `limit` (a positive int)."""
