"""What the Redis store's writing scripts are called with (redis_scripts.py gives each
script's KEYS and ARGV), and what their replies mean: WRITE_BATCH (BatchCall), APPEND_IF_NEW
(EntryCall) and an execution's update (update_args). Every record is packed and checked when
the call is built, before any I/O, so a bad record fails the call without sending anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..errors import RecordError
from ..nodes import Execution, ExecutionNode
from ._common import SupersedableVersions, check_execution_changes, fenced_out, split_if_fence
from .base import Fenced, Updates, fence_of
from .redis_layout import (
    STATUSES,
    VERSION_HEADER_SIZE,
    RedisKeys,
    execution_fields,
    pack_version,
    unpack_version,
)

__all__ = ["BatchCall", "EntryCall", "update_args", "score"]


def score(value: float) -> str:
    return repr(float(value))  # repr round-trips exactly; Redis parses it as a double


def update_args(execution_id: str, changes: dict[str, Any]) -> list[str | int]:
    """WRITE_EXECUTION's arguments for an update_execution() of `changes`."""
    if_fence = split_if_fence(changes)
    changes = check_execution_changes(changes)
    # Serialise through the record so each field is stored exactly as to_dict() has it.
    data = Execution(id=execution_id).evolve(**changes).to_dict()
    status = STATUSES.index(changes["status"]) + 1 if "status" in changes else 0
    lease = ""
    if "lease_deadline" in changes:
        lease = "-" if changes["lease_deadline"] is None else score(changes["lease_deadline"])
    return ["update", execution_id, "", status, lease,
            "" if if_fence is None else if_fence,
            *execution_fields(data, changes, execution_id)]


class BatchCall:
    """WRITE_BATCH's keys and arguments for `nodes` and `updates` (`keys` empty: nothing to
    write); `supersede`: a version may take the place of the RUNNING version it supersedes
    (False for append(), which keeps every version)."""

    def __init__(self, keys: RedisKeys, supersedable: SupersedableVersions[bytes],
                 nodes: Sequence[ExecutionNode], updates: Updates, *,
                 supersede: bool = True) -> None:
        self.nodes, self.supersedable = nodes, supersedable
        self.scripts = [(eid, keys.execution_script_keys(eid), update_args(eid, changes))
                        for eid, changes in updates]
        self.keys: list[str] = []
        self.args: list[Any] = []
        self.packed = [pack_version(node) for node in nodes]
        if not nodes and not self.scripts:
            return
        replacing = supersedable.firsts(node.id for node in nodes) if supersede \
            else [None] * len(nodes)
        node_args: list[Any] = []
        for node, value, replaces in zip(nodes, self.packed, replacing, strict=True):
            eid = node.execution_id
            self.keys += [keys.versions(node.id), keys.execution_nodes(eid),
                          keys.execution(eid), keys.checkpoint(eid), keys.checkpoint_seq(eid)]
            node_args += [value, node.seq, node.id, fence_of(node),
                          int(node.checkpoint is not None), replaces or b""]
        self.args = [len(nodes), len(self.scripts[0][1]) if self.scripts else 0, *node_args]
        for _, script_keys, args in self.scripts:
            self.keys += script_keys
            self.args += [len(args), *args]

    def replied(self, results: list[list[Any]]) -> tuple[Fenced, list[bool]]:
        """What the fence refused, and whether each update applied."""
        refused = tuple(dict.fromkeys(raw.decode() for raw in results[0]))
        for node, value in zip(self.nodes, self.packed, strict=True):  # latest comes last
            self.supersedable.written(node, None if node.id in refused else
                                      value[:VERSION_HEADER_SIZE])
        outcomes = results[1]
        fenced_updates = tuple(eid for (eid, _, _), done in
                               zip(self.scripts, outcomes, strict=True) if done == -1)
        return Fenced(refused, fenced_updates), [done == 1 for done in outcomes]


class EntryCall:
    """APPEND_IF_NEW's keys and arguments for a step's first record and its execution's
    `changes`, and append_if_new()'s answer from the reply."""

    def __init__(self, keys: RedisKeys, supersedable: SupersedableVersions[bytes],
                 node: ExecutionNode, changes: dict[str, Any]) -> None:
        if node.checkpoint is not None:
            raise RecordError(f"append_if_new() takes a node without a checkpoint; node "
                              f"{node.id} has one (use append()).")
        self.node, self.supersedable = node, supersedable
        eid = node.execution_id
        self.keys = [keys.versions(node.id), keys.execution_nodes(eid), keys.execution(eid)]
        self.args: list[Any] = [pack_version(node), node.seq, node.id, fence_of(node)]
        if changes:
            self.keys += keys.execution_script_keys(eid)
            self.args += update_args(eid, changes)

    def answer(self, raw: bytes | list[Any] | None) -> ExecutionNode | None:
        """None if the node was written; else its stored latest version. FencedOutError if
        the fence refused it."""
        node = self.node
        if isinstance(raw, list):  # ['fenced', record fence, execution fence]
            raise fenced_out(node.id, node.execution_id, int(raw[1]), int(raw[2]))
        if raw is None:
            self.supersedable.written(node, self.args[0][:VERSION_HEADER_SIZE])
            return None
        return unpack_version(raw, self.keys[0])
