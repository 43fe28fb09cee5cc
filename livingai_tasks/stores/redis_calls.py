"""What the Redis store's writing scripts are called with (redis_scripts.py gives each
script's KEYS and ARGV), and what their replies mean: WRITE_BATCH (BatchCall), APPEND_IF_NEW
(EntryCall) and an execution's update (update_args); and how such a call is made
(staged_call). Every record is packed and checked when the call is built, before any I/O,
so a bad record fails the call without sending anything. The versions themselves travel
beside the script, not in its arguments: `staged` lists the (staging key, packed version)
pairs staged_call pushes in the script's MULTI/EXEC.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import redis
from redis.commands.core import Script

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

__all__ = ["BatchCall", "EntryCall", "update_args", "score", "staged_call"]


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
        self.scripts = [(eid, keys.execution_script_keys(eid, statuses="status" in changes),
                         update_args(eid, changes)) for eid, changes in updates]
        self.keys: list[str] = []
        self.args: list[Any] = []
        self.packed = [pack_version(node) for node in nodes]
        self.staged = [(keys.staged(i), value) for i, value in enumerate(self.packed)]
        if not nodes and not self.scripts:
            return
        replacing = supersedable.firsts(node.id for node in nodes) if supersede \
            else [None] * len(nodes)
        node_args: list[Any] = []
        for node, (stage, value), replaces in zip(nodes, self.staged, replacing, strict=True):
            eid = node.execution_id
            self.keys += [keys.versions(node.id), keys.execution_nodes(eid),
                          keys.execution(eid), keys.checkpoint(eid), keys.checkpoint_seq(eid),
                          stage, keys.heads(eid)]
            node_args += [node.seq, node.id, fence_of(node), int(node.checkpoint is not None),
                          replaces or b"", value[:VERSION_HEADER_SIZE]]
        self.args = [len(nodes), *node_args]
        for _, script_keys, args in self.scripts:
            self.keys += script_keys
            self.args += [len(script_keys), len(args), *args]

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
    `changes`, and append_if_new()'s answer from the reply. `stage`: the index of its staging
    key (after a batch's versions, when it follows one in the same call)."""

    def __init__(self, keys: RedisKeys, supersedable: SupersedableVersions[bytes],
                 node: ExecutionNode, changes: dict[str, Any], *, stage: int = 0) -> None:
        if node.checkpoint is not None:
            raise RecordError(f"append_if_new() takes a node without a checkpoint; node "
                              f"{node.id} has one (use append()).")
        self.node, self.supersedable = node, supersedable
        eid = node.execution_id
        packed = pack_version(node)
        self.header = packed[:VERSION_HEADER_SIZE]
        self.staged = [(keys.staged(stage), packed)]
        self.keys = [keys.versions(node.id), keys.execution_nodes(eid), keys.execution(eid),
                     keys.staged(stage), keys.heads(eid)]
        self.args: list[Any] = [self.header, node.seq, node.id, fence_of(node)]
        if changes:
            self.keys += keys.execution_script_keys(eid, statuses="status" in changes)
            self.args += update_args(eid, changes)

    def answer(self, raw: bytes | list[Any] | None) -> ExecutionNode | None:
        """None if the node was written; else its stored latest version. FencedOutError if
        the fence refused it."""
        node = self.node
        if isinstance(raw, list):  # ['fenced', record fence, execution fence]
            raise fenced_out(node.id, node.execution_id, int(raw[1]), int(raw[2]))
        if raw is None:
            self.supersedable.written(node, self.header)
            return None
        return unpack_version(raw, self.keys[0])


def staged_call(client: redis.Redis, script: Script, keys: list[str], args: list[Any],
                 staged: list[tuple[str, bytes]]) -> Any:
    """`script` called by its SHA in one MULTI/EXEC after each staged version is pushed to
    its staging list (redis_scripts.py, place(): the script moves them without reading
    them); the script's reply. One round trip, atomic. If the server lost the script (a
    restart, SCRIPT FLUSH), nothing but the staging lists was written: it is loaded and the
    call made again once."""
    commands: list[tuple[Any, ...]] = [("MULTI",)]
    for key, value in staged:
        commands += [("DEL", key), ("RPUSH", key, value)]  # DEL: a failed call's leftover
    commands += [("EVALSHA", script.sha, len(keys), *keys, *args), ("EXEC",)]
    for attempt in (1, 2):
        replies = _transaction(client, commands)
        failed = next((r for r in replies if isinstance(r, Exception)), None)
        if isinstance(failed, redis.exceptions.NoScriptError) and attempt == 1:
            client.script_load(script.script)
            continue
        if failed is not None:
            raise failed
        return replies[-1]
    raise AssertionError("unreachable")  # the loop returns or raises


def _transaction(client: redis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
    """EXEC's replies to `commands` (MULTI first, EXEC last), each error among them as an
    exception instance. Sent on a pooled connection directly, packed here (_resp): redis-py's
    Pipeline object cost the caller ~27 us more per call than the round trip itself, and its
    packing of a step's entry (about 70 arguments, 60 KB) ~110 us where _resp takes ~20
    (measured beside this, 2026-12-06). A connection that failed mid-way is closed, never
    reused; a dropped pooled socket is retried once at once, as the client's other commands
    are."""
    packed = _resp(commands)
    pool = client.connection_pool
    conn: Any = pool.get_connection()  # redis-py's Connection: its methods are untyped

    def send_and_read() -> list[Any]:
        conn.send_packed_command([packed])
        for _ in commands[:-1]:  # MULTI's OK, then QUEUED for each command
            conn.read_response()
        return cast("list[Any]", conn.read_response())

    try:
        replies: list[Any] = conn.retry.call_with_retry(
            send_and_read, lambda _error: conn.disconnect())
        return replies
    except BaseException:
        conn.disconnect()  # replies may still be on their way: not for the next caller
        raise
    finally:
        pool.release(conn)


def _resp(commands: list[tuple[Any, ...]]) -> bytes:
    """`commands` in the Redis protocol, as one buffer (one send), with redis-py's rules for
    arguments: bytes as they are, str as UTF-8, int and float as their text; anything else
    (a bool, None) is a DataError, as redis-py raises."""
    out: list[bytes] = []
    for command in commands:
        out.append(b"*%d\r\n" % len(command))
        for arg in command:
            if isinstance(arg, str):
                arg = arg.encode()
            elif isinstance(arg, (bytearray, memoryview)):
                arg = bytes(arg)
            elif isinstance(arg, bytes):
                pass
            elif isinstance(arg, int) and not isinstance(arg, bool):
                arg = b"%d" % arg
            elif isinstance(arg, float):
                arg = repr(arg).encode()
            else:
                raise redis.DataError(f"Invalid input of type: {type(arg).__name__!r}. Convert "
                                      "to a bytes, string, int or float first.")
            out += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(out)
