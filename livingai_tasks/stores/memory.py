"""memory:// — a process-local store for unit tests of pure logic. Not durable, not shared."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

from ..errors import RecordError
from ..nodes import Execution, ExecutionNode, ExecutionStatus
from ._common import (
    check_execution_changes,
    check_page,
    mask_url,
    order_executions,
    sort_nodes,
)
from .base import Updates

__all__ = ["MemoryStore"]


class MemoryStore:
    def __init__(self, url: str = "memory://") -> None:
        self.url = mask_url(url)
        self._lock = threading.RLock()
        self._versions: dict[str, list[ExecutionNode]] = {}
        self._by_execution: dict[str, list[str]] = {}
        self._checkpoints: dict[str, ExecutionNode] = {}
        self._executions: dict[str, Execution] = {}

    def __repr__(self) -> str:
        return f"MemoryStore({self.url!r})"

    def append(self, nodes: Sequence[ExecutionNode]) -> None:
        self.write(nodes, ())

    def write(self, nodes: Sequence[ExecutionNode], updates: Updates) -> None:
        checked = [(eid, check_execution_changes(changes)) for eid, changes in updates]
        with self._lock:
            for node in nodes:
                versions = self._versions.setdefault(node.id, [])
                if not versions:
                    self._by_execution.setdefault(node.execution_id, []).append(node.id)
                versions.append(node)
                latest = self._checkpoints.get(node.execution_id)
                if node.checkpoint is not None and (latest is None or node.seq >= latest.seq):
                    self._checkpoints[node.execution_id] = node
            for eid, changes in checked:
                current = self._executions.get(eid)
                if current is not None:
                    self._executions[eid] = current.evolve(**changes)

    def append_if_new(self, node: ExecutionNode,
                      changes: dict[str, Any]) -> ExecutionNode | None:
        """As RedisStore.append_if_new: the first version and the execution's changes, or
        the latest version if there is one (nothing written)."""
        if node.checkpoint is not None:
            raise RecordError(f"append_if_new() takes a node without a checkpoint; node "
                              f"{node.id} has one (use append()).")
        with self._lock:
            versions = self._versions.get(node.id)
            if versions:
                return versions[-1]
            self.write([node], [(node.execution_id, changes)] if changes else [])
            return None

    def get_node(self, node_id: str) -> ExecutionNode | None:
        with self._lock:
            versions = self._versions.get(node_id)
            return versions[-1] if versions else None

    def node_versions(self, node_id: str) -> list[ExecutionNode]:
        with self._lock:
            return list(self._versions.get(node_id, []))

    def nodes(self, execution_id: str) -> list[ExecutionNode]:
        with self._lock:
            ids = self._by_execution.get(execution_id, [])
            return sort_nodes(self._versions[i][-1] for i in ids)

    def latest_checkpoint(self, execution_id: str) -> ExecutionNode | None:
        with self._lock:
            return self._checkpoints.get(execution_id)

    def put_execution(self, execution: Execution) -> None:
        with self._lock:
            self._executions[execution.id] = execution

    def create_execution(self, execution: Execution) -> bool:
        with self._lock:
            if execution.id in self._executions:
                return False
            self._executions[execution.id] = execution
            return True

    def update_execution(self, execution_id: str, **changes: Any) -> None:
        self.write((), [(execution_id, changes)])

    def get_execution(self, execution_id: str) -> Execution | None:
        with self._lock:
            return self._executions.get(execution_id)

    def list_executions(
        self,
        *,
        status: ExecutionStatus | None = None,
        lease_expired_before: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Execution]:
        check_page(limit, offset)
        with self._lock:
            rows = list(self._executions.values())
        return order_executions(rows, status, lease_expired_before)[offset : offset + limit]

    def claim(self, execution_id: str, *, fence: int, owner: str, lease_s: float) -> bool:
        with self._lock:
            current = self._executions.get(execution_id)
            if current is None or current.fence != fence:
                return False
            self._executions[execution_id] = current.evolve(
                fence=fence + 1,
                lease_owner=owner,
                lease_deadline=time.time() + lease_s,
                attempts=current.attempts + 1,
            )
            return True

    def migrate(self) -> None:
        pass

    def close(self) -> None:
        pass
