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
  check and its RUNNING record (with its lease) in one round trip. Where a store has it,
  the engine uses it; elsewhere a step reads, then queues its write.
- `SweepsHotTier` (TieredStore): `sweep_hot_tier()`, upkeep the recovery tick runs before it
  plans; it must not raise for an unreachable server.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

from ..nodes import Execution, ExecutionNode, ExecutionStatus

__all__ = ["Store", "AppendsIfNew", "SweepsHotTier", "EXECUTION_FIELDS", "Updates"]

# The fields update_execution() may change. id and created_at never change; fence only
# through claim(), so that a fencing token can only grow by a successful compare-and-set.
EXECUTION_FIELDS = frozenset(
    {"status", "current_node_id", "lease_owner", "lease_deadline", "attempts", "reason",
     "updated_at", "metadata"}
)

# write()'s execution changes: (execution id, {field: value}) pairs, applied in order.
Updates = Sequence[tuple[str, dict[str, Any]]]


@runtime_checkable
class Store(Protocol):
    """What every store implements (a third-party one too): the methods below and `url`.

    A store may also offer optional capabilities, each its own Protocol in this module:
    `AppendsIfNew` (append_if_new: a step's entry check and first record in one atomic
    step) and `SweepsHotTier` (sweep_hot_tier: upkeep of a cache tier, run by the recovery
    tick). Callers test for them with isinstance(store, AppendsIfNew) and fall back to the
    base methods when a store does not offer them.
    """

    url: str  # as given, password masked: safe to log

    # -- nodes: an append-only log of versions -------------------------------------------
    def append(self, nodes: Sequence[ExecutionNode]) -> None:
        """Append one new version of each node, atomically as one batch, in order.

        Never changes an earlier version. Later in the batch wins over earlier for the
        "latest version" of a node. Raises StoreUnavailableError if the server is down.
        """

    def get_node(self, node_id: str) -> ExecutionNode | None:
        """Latest version of a node (checkpoint blob included), or None."""

    def node_versions(self, node_id: str) -> list[ExecutionNode]:
        """Every version of a node, oldest first."""

    def nodes(self, execution_id: str) -> list[ExecutionNode]:
        """Latest version of each node of an execution, ordered by (seq, created_at, id)."""

    def latest_checkpoint(self, execution_id: str) -> ExecutionNode | None:
        """The execution's newest checkpoint (blob included), or None: among the node
        versions that carry one, the furthest step's (highest seq), and of that step's the
        last appended. So a write that lands late (re-sent after an outage, or queued in a
        slow worker while the next step ran elsewhere) never makes an earlier step's state
        the latest again."""

    def write(self, nodes: Sequence[ExecutionNode], updates: Updates) -> None:
        """append(nodes), then update_execution(id, **changes) for each update in order,
        as one atomic write (one round trip where the backend allows). The engine's
        writer sends each batch with it: records and execution changes queued together
        (a step's record and its lease, a last step and its COMPLETED) land together."""

    # -- executions: one mutable summary row each -----------------------------------------
    def put_execution(self, execution: Execution) -> None:
        """Insert the execution, or replace every field if it exists (fence included)."""

    def create_execution(self, execution: Execution) -> bool:
        """Insert the execution if absent. True if inserted, False if it already existed."""

    def update_execution(self, execution_id: str, **changes: Any) -> None:
        """Set some fields (names from EXECUTION_FIELDS, else ConfigError). updated_at is
        set to now unless given. A missing execution is a no-op."""

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
        from an index (never a scan of nodes or a Redis SCAN)."""

    def claim(self, execution_id: str, *, fence: int, owner: str, lease_s: float) -> bool:
        """Compare-and-set: if the stored fence equals `fence`, set fence to fence + 1,
        lease_owner to `owner`, lease_deadline to now + lease_s, attempts += 1, and return
        True. Otherwise (or if the execution is missing) change nothing and return False.
        Of N concurrent claimers with the same `fence`, exactly one wins."""

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
        exactly one writes. Takes a node without a checkpoint (RecordError otherwise)."""


@runtime_checkable
class SweepsHotTier(Protocol):
    """Optional: upkeep of a cache tier that may hold stale copies (the tiered store)."""

    def sweep_hot_tier(self) -> int:
        """Delete the cached copies recorded as possibly stale, then their records. Returns
        how many were swept (0 when there were none or a tier could not be reached: they
        wait for the next sweep). Never raises for an unreachable server."""
