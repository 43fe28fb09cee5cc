"""Where the Redis store keeps what: every key name, and the format of a stored version.

The key layout and the version format are the store's on-disk contract (a Redis with
appendonly keeps them across releases), so both are defined here and nowhere else.
"""

from __future__ import annotations

import struct

from ..errors import RecordError
from ..nodes import ExecutionNode, ExecutionStatus

__all__ = ["RedisKeys", "STATUSES", "pack_version", "unpack_version"]

STATUSES = list(ExecutionStatus)  # the order of the status-index KEYS the scripts receive


class RedisKeys:
    """Every key name the Redis store uses, in one place.

    The kind comes before the id, so no id (execution ids are caller-chosen) can make one
    key look like another kind's.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.created = f"{prefix}:idx:created"  # zset: execution id -> created_at epoch
        self.leases = f"{prefix}:idx:lease"  # zset: execution id -> lease_deadline epoch
        self.workers = f"{prefix}:workers"  # hash: worker -> JSON liveness record
        self.worker_expiry = f"{prefix}:idx:workers"  # zset: worker -> expires_at epoch
        self.pattern = f"{prefix}:*"  # every key of this prefix (the prefix has no glob chars)

    def versions(self, node_id: str) -> str:  # list: every version, oldest first
        return f"{self.prefix}:node:{node_id}"

    def execution_nodes(self, execution_id: str) -> str:  # zset: node id -> seq
        return f"{self.prefix}:ex-nodes:{execution_id}"

    def checkpoint(self, execution_id: str) -> str:  # string: packed version with a blob
        return f"{self.prefix}:ex-ckpt:{execution_id}"

    def checkpoint_seq(self, execution_id: str) -> str:  # string: the seq of that version
        return f"{self.prefix}:ex-ckpt-seq:{execution_id}"

    def execution(self, execution_id: str) -> str:  # hash: field -> JSON value
        return f"{self.prefix}:ex:{execution_id}"

    def status(self, status: ExecutionStatus) -> str:  # zset: execution id -> created_at
        return f"{self.prefix}:idx:status:{status.value}"

    def execution_script_keys(self, execution_id: str) -> list[str]:
        return [self.execution(execution_id), self.created, self.leases,
                *(self.status(s) for s in STATUSES)]


# -- one stored version: header, JSON, blob (never pickle: the data outlives the code) ----

_HEADER = struct.Struct(">BBI")  # format version, has-blob flag, JSON length
_FORMAT = 1


def pack_version(node: ExecutionNode) -> bytes:
    """One version as stored: header, the node's JSON, then its checkpoint blob if any."""
    body = node.to_json().encode()
    blob = node.checkpoint
    return _HEADER.pack(_FORMAT, blob is not None, len(body)) + body + (blob or b"")


def unpack_version(raw: bytes, where: str) -> ExecutionNode:
    """The node a pack_version() value holds; RecordError (naming `where`) if malformed."""
    if len(raw) < _HEADER.size:
        raise RecordError(f"Stored node version in {where} is truncated ({len(raw)} bytes).")
    fmt, has_blob, size = _HEADER.unpack_from(raw)
    end = _HEADER.size + size
    if fmt != _FORMAT or has_blob > 1 or len(raw) < end or (not has_blob and len(raw) != end):
        raise RecordError(f"Stored node version in {where} is not in format {_FORMAT} "
                          f"(header {fmt}/{has_blob}/{size}, {len(raw)} bytes).")
    return ExecutionNode.from_json(raw[_HEADER.size:end], raw[end:] if has_blob else None)
