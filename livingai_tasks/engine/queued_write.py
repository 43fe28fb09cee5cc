"""QueuedWrite: one write waiting in the write-behind queue, from submit() until durable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..nodes import Execution, ExecutionNode, Meta, Status

if TYPE_CHECKING:
    from .spill import SpillSegment

__all__ = ["QueuedWrite", "node_and_state"]


@dataclass(eq=False)
class QueuedWrite:
    kind: str  # "append" | "update" | "put"
    execution_id: str
    size: int
    node: ExecutionNode | None = None
    state: bytes | None = None  # raw state the writer still has to encode into node
    execution: Execution | None = None
    changes: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    enqueued: float = 0.0
    queued_behind: int = 0  # writes already queued when this one joined
    json_size: int = 0
    claimed: bool = False  # the writer or the encoder is compressing `state`
    priority: bool = False  # in the priority lane (lease renewals, a tool's start)
    after_seq: int = 0  # a priority write waits until the data lane has written this seq
    after_prio: QueuedWrite | None = None  # ... and until this earlier priority write landed
    done: bool = False  # durable, or rejected
    fenced: bool = False  # refused by the store: its execution moved to a newer fence
    outcome: str = ""  # what submit() did with it (write_behind's QUEUED, SPILLED, ...)
    spill: tuple[SpillSegment, int] | None = None  # read back from this spill file row

    @property
    def precedes_more(self) -> bool:
        """Likely to be followed soon by more of its step's records: a RUNNING version, and
        the lease a starting step takes, are; an outcome, or an update that completes or
        releases an execution, is not. The writer gathers only behind these (see
        writer.GATHER_S)."""
        if self.kind == "update":
            return self.changes.get("lease_owner") is not None
        return self.node is not None and self.node.status is Status.RUNNING

    def gathers(self, hold_outcomes: bool) -> bool:
        """Whether the writer waits for more behind this write: more of its step's records
        are likely to follow (precedes_more; writer.GATHER_S), or, with `hold_outcomes` (a
        store whose step entry can carry the writes queued before it, entry.py), it is an
        idempotent step's SUCCESS, held for the next step's entry in this process
        (writer.OUTCOME_HOLD_S). Only a step's (it carries its Celery request): a journaled
        call's record or an event goes as before."""
        node = self.node
        return self.precedes_more or (
            hold_outcomes and node is not None and node.status is Status.SUCCESS
            and Meta.REQUEST in node.metadata and node.is_idempotent())

    def conflict_keys(self) -> list[tuple[str, ...]]:
        """What this write changes in the store: a later write of any of the same keys must
        not land before it (a node's versions; an execution's fields, or the whole row)."""
        if self.kind == "append" and self.node is not None:
            return [("node", self.node.id)]
        if self.kind == "put":
            return [("put", self.execution_id)]
        # updated_at is set by every update: two updates that share only it may land in
        # either order (the row then says the older time, nothing else is wrong).
        return [("field", self.execution_id, name) for name in self.changes
                if name != "updated_at"]


def node_and_state(op: QueuedWrite | None) -> tuple[ExecutionNode | None, bytes | None]:
    """A queued write's node and its still raw state (None, None for no write)."""
    return (op.node, op.state) if op is not None else (None, None)
