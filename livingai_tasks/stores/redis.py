"""redis:// and rediss:// — the hot store the fleet shares.

    redis://[[user]:password@]host:6379/0?prefix=lai&socket_timeout=3
    rediss://...                                       the same over TLS

Durable only as far as the server's own persistence (appendonly) goes: a Redis without
persistence loses everything on restart. Put it over PostgreSQL (tiered.py) when that matters.

Layout (every name comes from redis_layout.RedisKeys; the Lua scripts are in redis_scripts.py):
one list per node holding every version, oldest first, so the latest version is LINDEX -1 and
the blob is stored once per version; one sorted
set per execution of its node ids scored by seq; a copy of the latest checkpoint-carrying
version per execution; one hash per execution, and one of its nodes' latest version headers;
and three kinds of sorted-set index: by
created time, by status, and by lease deadline (so expired leases are a ZRANGEBYSCORE); and
the worker liveness records (redis_workers.py): a hash of records and a sorted set of deadlines.
Every write of a version is one MULTI/EXEC: the version pushed to a staging list, then the
script that checks the fence and moves it (redis_calls.staged_call): the scripts never take the
versions as arguments, which cost the server more than everything else they do.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, cast

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from ..errors import (
    FencedOutError,
    RecordRefusedError,
    StoreError,
    StoreUnavailableError,
)
from ..nodes import Execution, ExecutionNode, ExecutionStatus, dumps_json
from . import redis_scripts as lua
from ._common import (
    SupersedableVersions,
    check_page,
    mask_url,
    sort_nodes,
)
from .base import Fenced, Updates
from .redis_calls import BatchCall, EntryCall, score, staged_call, update_args
from .redis_layout import (
    STATUSES,
    RedisKeys,
    execution_fields,
    execution_from_hash,
    readable_executions,
    unpack_version,
)
from .redis_side import RedisSideRecords
from .redis_url import ACCEPTED_PARAMS, RedisURL, parse_redis_url
from .redis_workers import RedisWorkers
from .rejected import RedisRejected

__all__ = ["RedisStore", "RedisKeys", "RedisURL", "parse_redis_url", "ACCEPTED_PARAMS"]

def _epoch(value: datetime) -> float:
    if value.tzinfo is None:  # the records treat naive datetimes as UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.timestamp()


log = logging.getLogger(__name__)


@dataclass
class _Connection:
    pid: int
    client: redis.Redis
    write_execution: Script
    claim: Script
    expired_with_status: Script
    append_if_new: Script
    write_batch: Script
    write_batch_then_append_if_new: Script


class RedisStore(RedisWorkers, RedisRejected, RedisSideRecords):
    """The Store protocol on Redis, with AppendsIfNew, TracksWorkers (redis_workers.py) and
    SetsAside (rejected.py).
    Nothing connects until the first call.

    Fencing happens in the Lua scripts that write: the execution's fence is read and the
    version written in one script, so no claim can come between them.

    Every call raises StoreUnavailableError when the server cannot be reached (the message
    names the URL, password masked), StoreError for other server errors, and RecordError
    when stored data cannot be decoded.
    """

    def __init__(self, url: str) -> None:
        parsed = parse_redis_url(url)
        self.url = mask_url(url)
        self.keys = RedisKeys(parsed.prefix)
        self._connect_url = parsed.connect_url
        self._socket_timeout = parsed.socket_timeout
        self._conn: _Connection | None = None
        self._supersedable = SupersedableVersions[bytes]()  # by their header (WRITE_BATCH)

    def __repr__(self) -> str:
        return f"RedisStore({self.url!r})"

    # -- connection -------------------------------------------------------------------

    def _connection(self) -> _Connection:
        conn = self._conn
        if conn is not None and conn.pid == os.getpid():
            return conn
        # First use, or a forked child: the parent's sockets are not ours to use. Two
        # threads racing here each build a client; one is kept, which is harmless.
        client = redis.Redis.from_url(
            self._connect_url,
            socket_timeout=self._socket_timeout,
            socket_connect_timeout=self._socket_timeout,
            # One immediate retry on a dropped connection (a pooled socket the server
            # closed); none on timeouts, where the command may already have run.
            retry=Retry(NoBackoff(), 1, supported_errors=(redis.ConnectionError,)),
        )
        conn = _Connection(os.getpid(), client, client.register_script(lua.WRITE_EXECUTION),
                           client.register_script(lua.CLAIM),
                           client.register_script(lua.EXPIRED_WITH_STATUS),
                           client.register_script(lua.APPEND_IF_NEW),
                           client.register_script(lua.WRITE_BATCH),
                           client.register_script(lua.WRITE_BATCH_THEN_APPEND_IF_NEW))
        self._conn = conn
        return conn

    @contextmanager
    def _talking(self) -> Iterator[_Connection]:
        try:
            yield self._connection()
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise StoreUnavailableError(
                f"Redis at {self.url} is unreachable ({type(exc).__name__}: {exc}). "
                "Check that the server runs and the URL is right."
            ) from exc
        except (redis.DataError, UnicodeError, OverflowError) as exc:
            raise RecordRefusedError(f"Redis at {self.url} cannot encode the record: "
                                     f"{type(exc).__name__}: {exc}") from exc
        except redis.ResponseError as exc:
            if _refuses_content(str(exc)):
                raise RecordRefusedError(f"Redis at {self.url} refused the record: "
                                         f"{type(exc).__name__}: {exc}") from exc
            raise StoreError(f"Redis at {self.url} failed: {type(exc).__name__}: {exc}") from exc
        except redis.RedisError as exc:
            raise StoreError(f"Redis at {self.url} failed: {type(exc).__name__}: {exc}") from exc

    # -- nodes ------------------------------------------------------------------------

    def append(self, nodes: Sequence[ExecutionNode]) -> Fenced:
        """Append the batch in one script call; fenced (see write())."""
        return self._write(nodes, (), supersede=False)[0]

    def write(self, nodes: Sequence[ExecutionNode], updates: Updates) -> Fenced:
        """append(nodes), then update_execution() of each update in order, all in one
        script call (atomic, one round trip). Returns what the fence refused."""
        return self._write(nodes, updates)[0]

    def _write(self, nodes: Sequence[ExecutionNode], updates: Updates, *,
               supersede: bool = True) -> tuple[Fenced, list[bool]]:
        """write(), also saying of each update whether it applied; `supersede`: False
        for append(), which keeps every version."""
        call = BatchCall(self.keys, self._supersedable, nodes, updates, supersede=supersede)
        if not call.keys:
            return Fenced(), []
        with self._talking() as conn:
            results = cast("list[list[Any]]", staged_call(conn.client, conn.write_batch,
                                                             call.keys, call.args, call.staged))
        return call.replied(results)

    def append_if_new(self, node: ExecutionNode,
                      changes: dict[str, Any]) -> ExecutionNode | None:
        """A step's entry check and its first record in one round trip: if no version of
        `node` is stored, append it and apply `changes` to its execution (both or neither)
        and return None; otherwise write nothing and return the latest version. Of two
        processes racing on one node exactly one writes. For a node without a checkpoint."""
        entry = EntryCall(self.keys, self._supersedable, node, changes)
        with self._talking() as conn:
            raw = cast("bytes | list[Any] | None", staged_call(
                conn.client, conn.append_if_new, entry.keys, entry.args, entry.staged))
        return entry.answer(raw)

    def write_then_append_if_new(self, nodes: Sequence[ExecutionNode], updates: Updates,
                                 node: ExecutionNode, changes: dict[str, Any]
                                 ) -> tuple[Fenced, ExecutionNode | None]:
        """write(nodes, updates), then append_if_new(node, changes), in one script call
        (WritesBeforeEntry). A failure of the write stops the script before the entry."""
        call = BatchCall(self.keys, self._supersedable, nodes, updates)
        if not call.keys:
            return Fenced(), self.append_if_new(node, changes)
        entry = EntryCall(self.keys, self._supersedable, node, changes,
                          stage=len(call.staged))
        with self._talking() as conn:
            written, raw = cast("list[Any]", staged_call(
                conn.client, conn.write_batch_then_append_if_new, call.keys + entry.keys,
                [len(call.keys), len(call.args), *call.args, *entry.args],
                call.staged + entry.staged))
        fenced = call.replied(written)[0]
        try:
            return fenced, entry.answer(raw)
        except FencedOutError as exc:
            exc.written = fenced  # type: ignore[attr-defined]  # the write did land
            raise

    def get_node(self, node_id: str) -> ExecutionNode | None:
        key = self.keys.versions(node_id)
        with self._talking() as conn:
            raw = cast("bytes | None", conn.client.lindex(key, -1))
        return None if raw is None else unpack_version(raw, key)

    def node_versions(self, node_id: str) -> list[ExecutionNode]:
        key = self.keys.versions(node_id)
        with self._talking() as conn:
            raws = cast("list[bytes]", conn.client.lrange(key, 0, -1))
        return [unpack_version(raw, key) for raw in raws]

    def nodes(self, execution_id: str) -> list[ExecutionNode]:
        with self._talking() as conn:
            index = self.keys.execution_nodes(execution_id)
            ids = cast("list[bytes]", conn.client.zrange(index, 0, -1))
            pipe = conn.client.pipeline(transaction=False)
            keys = [self.keys.versions(i.decode()) for i in ids]
            for key in keys:
                pipe.lindex(key, -1)
            raws: list[bytes | None] = pipe.execute() if keys else []
        pairs = zip(keys, raws, strict=True)
        return sort_nodes(unpack_version(raw, key) for key, raw in pairs if raw)

    def latest_checkpoint(self, execution_id: str) -> ExecutionNode | None:
        key = self.keys.checkpoint(execution_id)
        with self._talking() as conn:
            raw = cast("bytes | None", conn.client.get(key))
        return None if raw is None else unpack_version(raw, key)

    # -- executions -------------------------------------------------------------------

    def _write_execution(self, mode: str, execution: Execution) -> bool:
        data = execution.to_dict()
        deadline = execution.lease_deadline
        args: list[str | int] = [mode, execution.id, score(_epoch(execution.created_at)),
                STATUSES.index(execution.status) + 1,
                "-" if deadline is None else score(deadline), "",
                *execution_fields(data, data, execution.id)]
        with self._talking() as conn:
            done = conn.write_execution(self.keys.execution_script_keys(execution.id), args)
        return bool(done)

    def put_execution(self, execution: Execution) -> None:
        self._write_execution("replace", execution)

    def create_execution(self, execution: Execution) -> bool:
        return self._write_execution("create", execution)

    def update_execution(self, execution_id: str, **changes: Any) -> bool:
        """True if applied (False: missing, or its fence is above the changes' if_fence)."""
        args = update_args(execution_id, changes)
        with self._talking() as conn:
            done = conn.write_execution(self.keys.execution_script_keys(execution_id), args)
        return bool(done == 1)

    def get_execution(self, execution_id: str) -> Execution | None:
        key = self.keys.execution(execution_id)
        with self._talking() as conn:
            raw = cast("dict[bytes, bytes]", conn.client.hgetall(key))
        return execution_from_hash(raw, key) if raw else None

    def list_executions(
        self,
        *,
        status: ExecutionStatus | None = None,
        lease_expired_before: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Execution]:
        """Served from the sorted-set indexes; never a SCAN."""
        check_page(limit, offset)
        with self._talking() as conn:
            ids: Any  # list[bytes]: the client is built with decode_responses=False
            if lease_expired_before is not None and status is not None:
                ids = conn.expired_with_status(
                    [self.keys.leases, self.keys.status(ExecutionStatus(status))],
                    [score(lease_expired_before), offset, limit])
            elif lease_expired_before is not None:
                ids = conn.client.zrangebyscore(
                    self.keys.leases, "-inf", "(" + score(lease_expired_before),
                    start=offset, num=limit)
            else:
                index = self.keys.created if status is None else self.keys.status(
                    ExecutionStatus(status))
                ids = conn.client.zrevrange(index, offset, offset + limit - 1)
            pipe = conn.client.pipeline(transaction=False)
            keys = [self.keys.execution(i.decode()) for i in ids]
            for key in keys:
                pipe.hgetall(key)
            rows: list[dict[bytes, bytes]] = pipe.execute() if keys else []
        found = readable_executions(
            ((key, row) for key, row in zip(keys, rows, strict=True) if row), self.url)
        # The ids come from an index and the records from a second read: a record changed
        # in between (claimed, renewed, finished) no longer fits the filter. Handing it out
        # anyway gave a recovery tick a fresh fence to claim with: a double resume.
        return [e for e in found
                if (status is None or e.status == status)
                and (lease_expired_before is None or (
                    e.lease_deadline is not None and e.lease_deadline < lease_expired_before))]

    def claim(self, execution_id: str, *, fence: int, owner: str, lease_s: float,
              now: float | None = None) -> bool:
        """Compare-and-set on the fence and the lease's expiry in one Lua script."""
        now = time.time() if now is None else float(now)
        owner_json = dumps_json(owner, what="Lease owner")
        args: list[str | int] = [int(fence), owner_json, score(now + lease_s), execution_id,
                                 score(now)]
        with self._talking() as conn:
            won = conn.claim([self.keys.execution(execution_id), self.keys.leases], args)
        return bool(won)

    # -- upkeep -----------------------------------------------------------------------

    def evict(self, *, nodes: Iterable[str] = (), checkpoints: Iterable[str] = ()) -> None:
        """Drop cached copies (node version lists, execution checkpoints): the tiered store
        does so before it writes PostgreSQL, and after writes Redis may have missed."""
        # The checkpoint's seq key stays: it names a version already committed wherever
        # the copy came from, and keeps a late, earlier step's write from taking its place.
        keys = [*map(self.keys.versions, nodes), *map(self.keys.checkpoint, checkpoints)]
        if keys:
            with self._talking() as conn:
                conn.client.delete(*keys)

    def evict_all(self) -> None:
        """Drop every key under the prefix (SCAN + UNLINK). The tiered store's last resort
        after an outage too long to remember each write Redis missed; not a request path."""
        with self._talking() as conn:
            batch: list[bytes] = []
            for key in conn.client.scan_iter(match=self.keys.pattern, count=1000):
                batch.append(key)
                if len(batch) >= 1000:
                    conn.client.unlink(*batch)
                    batch.clear()
            if batch:
                conn.client.unlink(*batch)

    def migrate(self) -> None:
        """Nothing to do: Redis has no schema."""

    def close(self) -> None:
        """Close this process's connections. Idempotent; a later call reconnects."""
        conn, self._conn = self._conn, None
        if conn is not None and conn.pid == os.getpid():
            conn.client.close()


# Replies that depend on the record, not on the server's state: a key of the wrong type,
# an error raised inside one of our scripts (a stored fence that is not a number, say), a
# value over proto-max-bulk-len. Not BUSY, LOADING, OOM or READONLY, which pass. redis-py
# drops the "ERR " in front of a reply's text (its ResponseError says "user_script:58:
# ..."), so both spellings are matched: with only the prefixed one, a corrupted execution
# hash failed every retry of its batch, and the writes queued behind it never landed.
_REFUSING_REPLIES = ("WRONGTYPE", "Error running script", "user_script:",
                     "string exceeds maximum", "Protocol error: invalid bulk length")


def _refuses_content(reply: str) -> bool:
    return reply.removeprefix("ERR ").startswith(_REFUSING_REPLIES) or "WRONGTYPE" in reply
