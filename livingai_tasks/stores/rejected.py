"""The rejected-records area (SetsAside) of the SQL, Redis and memory stores.

A record a store refused for its content is kept as base64 text of its JSON: opaque, so the
content that was refused (a NUL, an unencodable character, a key of the wrong type) cannot
be refused again.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from contextlib import AbstractContextManager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import ConfigError
from .base import RejectedRecord
from .redis_layout import RedisKeys
from .sql_schema import REJECTED

__all__ = ["SQLRejected", "RedisRejected", "MemoryRejected", "check_limit", "opaque"]

log = logging.getLogger(__name__)

_REASON_MAX = 4000  # characters of the store's reason kept
# Redis keeps the newest this many: Redis holds everything in memory, and a flood of refused
# records (a bug writing bad data in a loop) must not fill it. Each is logged at ERROR too.
REDIS_KEPT = 100_000


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be a positive int, got {limit!r}")
    return limit


def opaque(text: str) -> str:
    """`text` with every character a store could refuse escaped (ASCII out)."""
    # NUL is ASCII, so backslashreplace keeps it: PostgreSQL text refuses it.
    return text.replace("\x00", "\\u0000").encode("ascii", "backslashreplace").decode("ascii")


class SQLRejected:
    """SetsAside for SQLStore (which provides _transaction)."""

    def _transaction(self, *, write: bool) -> AbstractContextManager[Connection]:
        raise NotImplementedError  # SQLStore's

    def set_aside(self, kind: str, execution_id: str, node_id: str | None, payload: bytes,
                  reason: str) -> None:
        with self._transaction(write=True) as conn:
            conn.execute(sa.insert(REJECTED).values(
                _record(kind, execution_id, node_id, payload, reason)))

    def rejected(self, limit: int = 100) -> list[RejectedRecord]:
        check_limit(limit)
        with self._transaction(write=False) as conn:
            rows = conn.execute(sa.select(REJECTED).order_by(REJECTED.c.id.desc())
                                .limit(limit)).mappings().all()
        return [RejectedRecord(kind=r["kind"], execution_id=r["execution_id"],
                               node_id=r["node_id"], payload=base64.b64decode(r["payload"]),
                               reason=r["reason"], rejected_at=float(r["rejected_at"]))
                for r in rows]


def _record(kind: str, execution_id: str, node_id: str | None, payload: bytes,
            reason: str) -> dict[str, Any]:
    return {"kind": kind, "execution_id": opaque(execution_id),
            "node_id": None if node_id is None else opaque(node_id),
            "payload": base64.b64encode(payload).decode("ascii"),
            "reason": opaque(reason)[:_REASON_MAX], "rejected_at": time.time()}


class RedisRejected:
    """SetsAside for RedisStore (which provides keys and _talking): a list of JSON records
    under keys.rejected, newest first, capped at REDIS_KEPT."""

    keys: RedisKeys

    def _talking(self) -> AbstractContextManager[Any]:
        raise NotImplementedError  # RedisStore's

    def set_aside(self, kind: str, execution_id: str, node_id: str | None, payload: bytes,
                  reason: str) -> None:
        record = json.dumps(_record(kind, execution_id, node_id, payload, reason))
        with self._talking() as conn:
            pipe = conn.client.pipeline(transaction=True)
            pipe.lpush(self.keys.rejected, record)
            pipe.ltrim(self.keys.rejected, 0, REDIS_KEPT - 1)
            pipe.execute()

    def rejected(self, limit: int = 100) -> list[RejectedRecord]:
        check_limit(limit)
        with self._talking() as conn:
            raws = conn.client.lrange(self.keys.rejected, 0, limit - 1)
        out: list[RejectedRecord] = []
        for raw in raws:
            try:
                r = json.loads(raw)
                out.append(RejectedRecord(kind=r["kind"], execution_id=r["execution_id"],
                                          node_id=r["node_id"],
                                          payload=base64.b64decode(r["payload"]),
                                          reason=r["reason"],
                                          rejected_at=float(r["rejected_at"])))
            except (ValueError, TypeError, KeyError) as exc:  # edited by hand: skip it
                log.error("Skipping an unreadable entry of %s: %s", self.keys.rejected, exc)
        return out


class MemoryRejected:
    """SetsAside for MemoryStore: a list under its own lock."""

    def __init__(self) -> None:
        self._rejected: list[RejectedRecord] = []
        self._rejected_lock = threading.Lock()

    def set_aside(self, kind: str, execution_id: str, node_id: str | None, payload: bytes,
                  reason: str) -> None:
        r = _record(kind, execution_id, node_id, payload, reason)  # as the other stores do
        with self._rejected_lock:
            self._rejected.append(RejectedRecord(kind, r["execution_id"], r["node_id"],
                                                 bytes(payload), r["reason"],
                                                 r["rejected_at"]))

    def rejected(self, limit: int = 100) -> list[RejectedRecord]:
        check_limit(limit)
        with self._rejected_lock:
            return list(reversed(self._rejected))[:limit]
