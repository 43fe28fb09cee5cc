"""What a step message carries for us: one StepIdentity, written as four flat headers.

Every place that publishes a step (a running step's next one, start(), recovery, resolve)
builds the headers from a StepIdentity, and every place that reads a delivery reads them
back into one, so the wire format is written down here only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..nodes import ExecutionNode, NodeType

__all__ = [
    "StepIdentity",
    "HEADER_EXECUTION",
    "HEADER_PARENT",
    "HEADER_SEQ",
    "HEADER_FENCE",
    "tag_kwargsrepr",
    "is_tagged",
]

# Message headers that carry the execution across publishes (flat, JSON-safe values).
HEADER_EXECUTION = "lai_execution_id"
HEADER_PARENT = "lai_parent_id"
HEADER_SEQ = "lai_seq"
HEADER_FENCE = "lai_fence"
_HEADERS = (HEADER_EXECUTION, HEADER_PARENT, HEADER_SEQ, HEADER_FENCE)


@dataclass(frozen=True)
class StepIdentity:
    """Where a step sits: its execution, the node before it, its place, and the fence
    (the execution's recovery generation) it was published under."""

    execution_id: str
    parent_id: str | None = None
    seq: int = 1
    fence: int = 0

    @classmethod
    def of_node(cls, node: ExecutionNode, fence: int) -> StepIdentity:
        """The identity a recorded step is published again with, under `fence`."""
        return cls(node.execution_id, node.parent_id, node.seq, fence)

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any]) -> StepIdentity | None:
        if headers.get(HEADER_EXECUTION) is None:
            return None
        return cls(str(headers[HEADER_EXECUTION]), headers.get(HEADER_PARENT),
                   int(headers.get(HEADER_SEQ) or 1), int(headers.get(HEADER_FENCE) or 0))

    @classmethod
    def from_request(cls, request: Any) -> StepIdentity | None:
        """From a task request: a worker delivery has our headers as top-level attributes,
        an eager apply(headers=...) keeps them in request.headers."""
        nested = getattr(request, "headers", None) or {}
        found = {}
        for name in _HEADERS:
            value = getattr(request, name, None)
            if value is None:
                value = nested.get(name)
            if value is not None:
                found[name] = value
        return cls.from_headers(found)

    def to_headers(self) -> dict[str, Any]:
        return {HEADER_EXECUTION: self.execution_id, HEADER_PARENT: self.parent_id,
                HEADER_SEQ: self.seq, HEADER_FENCE: self.fence}

    def next_step(self, node_id: str) -> StepIdentity:
        """The identity of the step that follows node `node_id` (which has this identity)."""
        return StepIdentity(self.execution_id, node_id, self.seq + 1, self.fence)

    def for_publish(self, node_id: str, task_id: str | None) -> StepIdentity:
        """What a message published from inside step `node_id` carries: the same identity
        for the step's own Task.retry() (the same task id again), else the next step's."""
        return self if task_id == node_id else self.next_step(node_id)


_TAG = "[livingai execution="


def tag_kwargsrepr(shown: str, identity: StepIdentity, node_type: NodeType) -> str:
    """Flower shows only what Celery's events carry; kwargsrepr is one of them, so the
    execution, seq and step type become readable in its task list and API."""
    return f"{shown} {_TAG}{identity.execution_id} seq={identity.seq} type={node_type.value}]"


def is_tagged(kwargsrepr: Any) -> bool:
    return _TAG in str(kwargsrepr)
