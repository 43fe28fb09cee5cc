"""memory:// — a process-local store for unit tests of pure logic. Not durable, not shared.

It keeps the whole contract (fenced writes, claim conditions, AppendsIfNew, TracksWorkers)
under one lock, so tests of pure logic see what the real stores do."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import FencedOutError, RecordError
from ..nodes import Execution, ExecutionNode, ExecutionStatus
from ._common import (
    check_execution_changes,
    check_page,
    fenced_out,
    mask_url,
    order_executions,
    sort_nodes,
    split_if_fence,
)
from .base import Fenced, Updates, WorkerRecord, check_counters, fence_of
from .rejected import MemoryRejected

__all__ = ["MemoryStore"]


class MemoryStore(MemoryRejected):
    def __init__(self, url: str = "memory://") -> None:
        super().__init__()
        self.url = mask_url(url)
        self._lock = threading.RLock()
        self._versions: dict[str, list[ExecutionNode]] = {}
        self._by_execution: dict[str, list[str]] = {}
        self._checkpoints: dict[str, ExecutionNode] = {}
        self._executions: dict[str, Execution] = {}
        self._workers: dict[str, WorkerRecord] = {}
        self._side: dict[tuple[str, str], dict[str, bytes]] = {}

    def __repr__(self) -> str:
        return f"MemoryStore({self.url!r})"

    def append(self, nodes: Sequence[ExecutionNode]) -> Fenced:
        return self.write(nodes, ())

    def _fence(self, execution_id: str) -> int:
        current = self._executions.get(execution_id)
        return -1 if current is None else current.fence  # a missing execution fences nothing

    def write(self, nodes: Sequence[ExecutionNode], updates: Updates) -> Fenced:
        checked = [(eid, split_if_fence(changes), check_execution_changes(changes))
                   for eid, changes in updates]
        refused_nodes: list[str] = []
        refused_updates: list[str] = []
        with self._lock:
            for node in nodes:
                if fence_of(node) < self._fence(node.execution_id):
                    refused_nodes.append(node.id)
                    continue
                versions = self._versions.setdefault(node.id, [])
                if not versions:
                    self._by_execution.setdefault(node.execution_id, []).append(node.id)
                versions.append(node)
                latest = self._checkpoints.get(node.execution_id)
                if node.checkpoint is not None and (latest is None or node.seq >= latest.seq):
                    self._checkpoints[node.execution_id] = node
            for eid, if_fence, changes in checked:
                current = self._executions.get(eid)
                if current is None:
                    continue
                if if_fence is not None and current.fence > if_fence:
                    refused_updates.append(eid)
                    continue
                self._executions[eid] = current.evolve(**changes)
        return Fenced(tuple(dict.fromkeys(refused_nodes)), tuple(refused_updates))

    def append_if_new(self, node: ExecutionNode,
                      changes: dict[str, Any]) -> ExecutionNode | None:
        """As RedisStore.append_if_new: the first version and the execution's changes, or
        the latest version if there is one (nothing written)."""
        if node.checkpoint is not None:
            raise RecordError(f"append_if_new() takes a node without a checkpoint; node "
                              f"{node.id} has one (use append()).")
        if_fence = split_if_fence(changes)
        check_execution_changes(changes)
        with self._lock:
            current = self._fence(node.execution_id)
            record = min(fence_of(node), current if if_fence is None else if_fence)
            if record < current:
                raise fenced_out(node.id, node.execution_id, record, current)
            versions = self._versions.get(node.id)
            if versions:
                return versions[-1]
            self.write([node], [(node.execution_id, changes)] if changes else [])
            return None

    def write_then_append_if_new(self, nodes: Sequence[ExecutionNode], updates: Updates,
                                 node: ExecutionNode, changes: dict[str, Any]
                                 ) -> tuple[Fenced, ExecutionNode | None]:
        """As RedisStore.write_then_append_if_new: write(), then append_if_new(), at once."""
        with self._lock:
            fenced = self.write(nodes, updates)
            try:
                return fenced, self.append_if_new(node, changes)
            except FencedOutError as exc:
                exc.written = fenced  # type: ignore[attr-defined]  # the write did land
                raise

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

    def update_execution(self, execution_id: str, **changes: Any) -> bool:
        with self._lock:
            exists = execution_id in self._executions
            return exists and not self.write((), [(execution_id, changes)])

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

    def claim(self, execution_id: str, *, fence: int, owner: str, lease_s: float,
              now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._lock:
            current = self._executions.get(execution_id)
            if current is None or current.fence != fence:
                return False
            if current.lease_deadline is not None and current.lease_deadline >= now:
                return False  # the lease is live: its holder renewed it
            self._executions[execution_id] = current.evolve(
                fence=fence + 1,
                lease_owner=owner,
                lease_deadline=now + lease_s,
                attempts=current.attempts + 1,
            )
            return True

    # -- TracksWorkers ------------------------------------------------------------------
    def beat_worker(self, worker: str, *, expires_at: float, owners: Sequence[str],
                    holding: Sequence[str], counters: Mapping[str, float] | None = None
                    ) -> None:
        kept = check_counters(counters, worker)
        with self._lock:
            self._workers[worker] = WorkerRecord(worker, float(expires_at), tuple(owners),
                                                 tuple(holding), kept)

    def workers(self, limit: int = 1000) -> list[WorkerRecord]:
        check_page(limit, 0)
        with self._lock:
            return sorted(self._workers.values(), key=lambda w: w.worker)[:limit]

    def dead_workers(self, now: float, limit: int = 100) -> list[WorkerRecord]:
        check_page(limit, 0)
        with self._lock:
            dead = [w for w in self._workers.values() if w.expires_at < now]
        return sorted(dead, key=lambda w: (w.expires_at, w.worker))[:limit]

    def worker(self, worker: str) -> WorkerRecord | None:
        with self._lock:
            return self._workers.get(worker)

    def forget_worker(self, worker: str) -> None:
        with self._lock:
            self._workers.pop(worker, None)

    def side_get(self, space: str, group: str) -> dict[str, bytes]:
        with self._lock:
            return dict(self._side.get((space, group), {}))

    def side_put(self, space: str, group: str, records: Mapping[str, bytes], *,
                 replace: bool = True) -> None:
        with self._lock:
            held = self._side.setdefault((space, group), {})
            for key, value in records.items():
                if replace or key not in held:
                    held[key] = bytes(value)
            if not held:
                del self._side[(space, group)]

    def side_delete(self, space: str, group: str, keys: Sequence[str] | None = None) -> None:
        with self._lock:
            held = self._side.get((space, group), {})
            for key in held.copy() if keys is None else keys:
                held.pop(key, None)
            if not held:
                self._side.pop((space, group), None)

    def side_groups(self, space: str) -> list[str]:
        with self._lock:
            return sorted(g for s, g in self._side if s == space)

    def migrate(self) -> None:
        pass

    def close(self) -> None:
        pass
