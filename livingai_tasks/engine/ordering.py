"""PriorityOrder: what a priority write must wait for, so that it never overtakes a write it
depends on.

The priority lane (lease renewals, a non-idempotent tool's start) is served before the data
lane. A priority write still waits for every earlier write of the same keys (a node's
versions; a field of an execution, or a put of it; see QueuedWrite.conflict_keys()): the
newest such data write in memory (its seq: the data lane lands in seq order), any data
write of its execution still in the spill (their keys are on disk, so the newest spilled
seq of the execution stands for them), and the newest earlier priority write of the same
keys. Priority writes that depend on nothing pending pass one that waits.
Memory: one entry per key of a write in memory, one per execution with spilled writes.
"""

from __future__ import annotations

from .queued_write import QueuedWrite

__all__ = ["PriorityOrder"]


class PriorityOrder:
    """The dependency bookkeeping of one write-behind queue; called with its lock held."""

    def __init__(self) -> None:
        self._data_by_key: dict[tuple[str, ...], QueuedWrite] = {}
        self._prio_by_key: dict[tuple[str, ...], QueuedWrite] = {}
        self._spilled_seq: dict[str, int] = {}  # newest spilled data write of an execution

    def queued(self, op: QueuedWrite, done_seq: int) -> None:
        """`op` joins a lane (its seq not yet set); for a priority write, set what it waits
        for. `done_seq`: the data lane's progress."""
        keys = op.conflict_keys()
        if not op.priority:
            for key in keys:
                self._data_by_key[key] = op
            return
        deps = [dep.seq for key in [*keys, ("put", op.execution_id)]
                if (dep := self._data_by_key.get(key)) is not None]
        spilled = self._spilled_seq.get(op.execution_id, 0)
        op.after_seq = max([*deps, spilled if spilled > done_seq else 0])
        for key in keys:
            earlier = self._prio_by_key.get(key)
            if earlier is not None and (op.after_prio is None or earlier.seq > op.after_prio.seq):
                op.after_prio = earlier
            self._prio_by_key[key] = op

    def spilled(self, op: QueuedWrite) -> None:
        """Data write `op` (seq set) went to the spill."""
        self._spilled_seq[op.execution_id] = op.seq

    def written(self, op: QueuedWrite) -> None:
        """`op` left its lane (durable, or rejected)."""
        by_key = self._prio_by_key if op.priority else self._data_by_key
        for key in op.conflict_keys():
            if by_key.get(key) is op:
                del by_key[key]
        if not op.priority and self._spilled_seq.get(op.execution_id, -1) <= op.seq:
            self._spilled_seq.pop(op.execution_id, None)

    @staticmethod
    def ready(op: QueuedWrite, done_seq: int) -> bool:
        """Whether priority write `op` may be sent: every write it depends on has landed."""
        return op.after_seq <= done_seq and (op.after_prio is None or op.after_prio.done)

    def clear(self) -> None:
        self._data_by_key.clear()
        self._prio_by_key.clear()
        self._spilled_seq.clear()
