"""Where the Redis store keeps what: every key name, and the format of a stored version.

The key layout and the version format are the store's on-disk contract (a Redis with
appendonly keeps them across releases), so both are defined here and nowhere else.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
import zlib
from collections.abc import Iterable
from typing import Any

from ..errors import CorruptRecordError
from ..nodes import Execution, ExecutionNode, ExecutionStatus, dumps_json
from .corrupt import skip_corrupt

__all__ = ["RedisKeys", "STATUSES", "pack_version", "unpack_version", "SEALED_FIELDS",
           "SEAL_FIELD", "execution_seal", "execution_fields", "execution_from_hash",
           "readable_executions"]

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
        self.rejected = f"{prefix}:rejected"  # list: JSON of each record set aside, newest first
        self.pattern = f"{prefix}:*"  # every key of this prefix (the prefix has no glob chars)

    def side_space(self, space: str) -> str:  # set: the groups of a space (KeepsSideRecords)
        return f"{self.prefix}:side:{space}"

    def side_group(self, space: str, group: str) -> str:  # hash: key -> record bytes
        return f"{self.prefix}:side:{space}:g:{group}"

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

    def heads(self, execution_id: str) -> str:  # hash: node id -> its latest version's header
        return f"{self.prefix}:ex-heads:{execution_id}"

    def staged(self, index: int) -> str:
        """list: the `index`th version of one write call, on its way to its node's list.
        A call's MULTI/EXEC pushes it and the call's script moves it (RENAME), so it never
        outlives the call unless the script failed (the next call's DEL clears it)."""
        return f"{self.prefix}:stage:{index}"

    def status(self, status: ExecutionStatus) -> str:  # zset: execution id -> created_at
        return f"{self.prefix}:idx:status:{status.value}"

    def execution_script_keys(self, execution_id: str, *, statuses: bool = True) -> list[str]:
        """WRITE_EXECUTION's keys; the status indexes only if the write sets a status
        (`statuses`): a lease renewal, a step's every entry, sends three keys, not ten."""
        keys = [self.execution(execution_id), self.created, self.leases]
        return keys + [self.status(s) for s in STATUSES] if statuses else keys


# -- one stored version: header, JSON, blob (never pickle: the data outlives the code) ----
# Format 2 adds a CRC32 of the JSON and blob: a flipped byte inside a JSON string still
# parses, so without it an edited `args` would be read back silently. Format 1 values
# (written before) stay readable, unverified.

_HEADER_V1 = struct.Struct(">BBI")  # format version, has-blob flag, JSON length
_HEADER = struct.Struct(">BBII")  # the same, then the CRC32 of everything after the header
_FORMAT = 2
# The header says which version a value is (its length and CRC32): WRITE_BATCH compares a
# list's last value with one by its first VERSION_HEADER_SIZE bytes.
VERSION_HEADER_SIZE = _HEADER.size
_EXECUTION_ID = re.compile(rb'"execution_id":\s*"([^"\\]{1,200})"')


def pack_version(node: ExecutionNode) -> bytes:
    """One version as stored: header, the node's JSON, then its checkpoint blob if any."""
    payload = node.to_json().encode()
    size = len(payload)
    if node.checkpoint is not None:
        payload += node.checkpoint
    return _HEADER.pack(_FORMAT, node.checkpoint is not None, size, zlib.crc32(payload)) + payload


def unpack_version(raw: bytes, where: str) -> ExecutionNode:
    """The node a pack_version() value holds; CorruptRecordError naming `where` (the key, so
    the node id) and, when still legible, the execution id, if it is malformed."""
    fmt = raw[0] if raw else None
    header = _HEADER_V1 if fmt == 1 else _HEADER
    if fmt not in (1, _FORMAT) or len(raw) < header.size:
        raise _corrupt(raw, where, f"unknown format {fmt} or truncated ({len(raw)} bytes)")
    _, has_blob, size, *crc = header.unpack_from(raw)
    end = header.size + size
    if has_blob > 1 or len(raw) < end or (not has_blob and len(raw) != end):
        raise _corrupt(raw, where, f"header {fmt}/{has_blob}/{size} does not fit "
                                   f"{len(raw)} bytes")
    if crc and zlib.crc32(raw[header.size:]) != crc[0]:
        raise _corrupt(raw, where, "CRC32 mismatch")
    try:
        return ExecutionNode.from_json(raw[header.size:end], raw[end:] if has_blob else None)
    except (ValueError, TypeError, KeyError) as exc:
        raise _corrupt(raw, where, str(exc)) from exc


def _ids(raw: bytes) -> tuple[str | None, str | None]:
    """The (node id, execution id) a damaged version still shows: its JSON's top level when
    that parses (the blob may be what is damaged), else a search for the execution id."""
    try:
        _, _, size, _ = _HEADER.unpack_from(raw)
        data = json.loads(raw[_HEADER.size:_HEADER.size + size])
        return str(data["id"]), str(data["execution_id"])
    except (ValueError, TypeError, KeyError, IndexError, struct.error):
        found = _EXECUTION_ID.search(raw)
        return None, found.group(1).decode(errors="replace") if found else None


def _corrupt(raw: bytes, where: str, reason: str) -> CorruptRecordError:
    node_id, found = _ids(raw)
    execution = found or "unknown"
    if ":node:" in where:  # the key names the node for certain
        node_id = where.split(":node:", 1)[-1]
    return CorruptRecordError(f"Stored node version at Redis key {where} (node {node_id}, "
                              f"execution {execution}) is corrupt: {reason}.",
                              execution_id=execution,
                              node_id=node_id, key=where)


# -- one execution: a hash of field -> JSON value, sealed --------------------------------
# Every script that writes an execution hash ends by storing SEAL_FIELD: the SHA-1 (the one
# digest Redis's Lua offers) of its SEALED_FIELDS, in this order, each present one as
# b"name=value", joined by b"\n". Reads check it, so a value edited in place (metadata
# changed, a status rewritten) is reported. A hash without it (written before) reads
# unverified.

SEALED_FIELDS = tuple(Execution(id="-").to_dict())
SEAL_FIELD = "checksum"


def execution_seal(raw: dict[bytes, bytes]) -> str:
    parts = [name.encode() + b"=" + raw[name.encode()] for name in SEALED_FIELDS
             if name.encode() in raw]
    return hashlib.sha1(b"\n".join(parts), usedforsecurity=False).hexdigest()


def execution_fields(data: dict[str, Any], names: Iterable[str], eid: str) -> list[str]:
    """HSET arguments: each named field of `data` as JSON."""
    out: list[str] = []
    for name in names:
        out += [name, dumps_json(data[name], what=f"Execution {eid} field {name!r}")]
    return out


def execution_from_hash(raw: dict[bytes, bytes], where: str) -> Execution:
    """The execution a hash holds; CorruptRecordError naming the key if it fails its seal
    or cannot be decoded."""
    eid = where.rsplit(":ex:", 1)[-1]
    fields = dict(raw)
    stored = fields.pop(SEAL_FIELD.encode(), None)
    try:
        if stored is not None and stored.decode(errors="replace") != execution_seal(fields):
            raise ValueError(f"checksum mismatch (stored {stored[:12]!r}..., computed "
                             f"{execution_seal(fields)[:12]}...): a field was changed outside "
                             "the store")
        return Execution.from_dict({k.decode(): json.loads(v) for k, v in fields.items()})
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptRecordError(f"Stored execution {eid} at Redis key {where} is corrupt or "
                                 f"not valid JSON: {exc}", execution_id=eid, key=where) from exc


def readable_executions(rows: Iterable[tuple[str, dict[bytes, bytes]]],
                        store_url: str) -> list[Execution]:
    """A listing skips a corrupt hash (logged once, collected: stores/corrupt.py) so one bad
    record never hides the others from the recovery tick, `list` or `stats`."""
    out: list[Execution] = []
    for key, raw in rows:
        try:
            out.append(execution_from_hash(raw, key))
        except CorruptRecordError as exc:
            skip_corrupt(store_url, exc)
    return out
