"""QueuedWrite: one write waiting in the write-behind queue, from submit() until durable."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..nodes import Execution, ExecutionNode

__all__ = ["QueuedWrite"]


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
