"""SaveResult and WriteResult: what a write call tells its caller when it returns."""

from __future__ import annotations

from dataclasses import dataclass

from ..nodes import ExecutionNode
from .budget import DURABLE, ms_since
from .write_behind import DROPPED

__all__ = ["SaveResult", "WriteResult", "OUTCOMES", "write_result"]

# What became of a write when its call returned (SaveResult.outcome, WriteResult.outcome).
OUTCOMES = ("durable", "queued", "spilled", "dropped")


@dataclass(frozen=True)
class SaveResult:
    # The version saved: as stored when durable. Otherwise its checkpoint may still be None
    # while the writer thread compresses the state; get_node() and load() serve it whole.
    node: ExecutionNode
    durable: bool  # the store had it before save() returned
    held_ms: float  # how long the caller was held, from call to return
    queued: bool  # False only if dropped (True for a spilled write: it is queued on disk)
    dropped: bool  # the queue was full and queue_full="drop" dropped it (or it was closed)
    # "durable": the store has it; "queued": in this process's memory queue, the writer
    # retries it until the store has it; "spilled": the memory queue was full, it waits in
    # the spill file on local disk (and survives this process); "dropped": lost, counted.
    outcome: str = "durable"


@dataclass(frozen=True)
class WriteResult:
    """What update_execution() / put_execution() did; fields as in SaveResult."""

    durable: bool
    held_ms: float
    queued: bool
    dropped: bool
    outcome: str = "durable"


def write_result(outcome: str, start: float) -> WriteResult:
    return WriteResult(outcome == DURABLE, ms_since(start), outcome != DROPPED,
                       outcome == DROPPED, outcome)
