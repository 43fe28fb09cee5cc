"""The rejected-records area (SetsAside) of the SQL and memory stores.

A record a store refused for its content is kept as base64 text of its JSON: opaque, so the
content that was refused (a NUL, an unencodable character) cannot be refused again.
"""

from __future__ import annotations

import base64
import threading
import time
from contextlib import AbstractContextManager

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from ..errors import ConfigError
from .base import RejectedRecord
from .sql_schema import REJECTED

__all__ = ["SQLRejected", "MemoryRejected", "check_limit", "opaque"]

_REASON_MAX = 4000  # characters of the store's reason kept


def check_limit(limit: int) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be a positive int, got {limit!r}")
    return limit


def opaque(text: str) -> str:
    """`text` with every character a store could refuse escaped (ASCII out)."""
    return text.encode("ascii", "backslashreplace").decode("ascii").replace("\\x00", "\\u0000")


class SQLRejected:
    """SetsAside for SQLStore (which provides _transaction)."""

    def _transaction(self, *, write: bool) -> AbstractContextManager[Connection]:
        raise NotImplementedError  # SQLStore's

    def set_aside(self, kind: str, execution_id: str, node_id: str | None, payload: bytes,
                  reason: str) -> None:
        with self._transaction(write=True) as conn:
            conn.execute(sa.insert(REJECTED).values(
                kind=kind, execution_id=opaque(execution_id),
                node_id=None if node_id is None else opaque(node_id),
                payload=base64.b64encode(payload).decode("ascii"),
                reason=opaque(reason)[:_REASON_MAX], rejected_at=time.time()))

    def rejected(self, limit: int = 100) -> list[RejectedRecord]:
        check_limit(limit)
        with self._transaction(write=False) as conn:
            rows = conn.execute(sa.select(REJECTED).order_by(REJECTED.c.id.desc())
                                .limit(limit)).mappings().all()
        return [RejectedRecord(kind=r["kind"], execution_id=r["execution_id"],
                               node_id=r["node_id"], payload=base64.b64decode(r["payload"]),
                               reason=r["reason"], rejected_at=float(r["rejected_at"]))
                for r in rows]


class MemoryRejected:
    """SetsAside for MemoryStore: a list under its own lock."""

    def __init__(self) -> None:
        self._rejected: list[RejectedRecord] = []
        self._rejected_lock = threading.Lock()

    def set_aside(self, kind: str, execution_id: str, node_id: str | None, payload: bytes,
                  reason: str) -> None:
        with self._rejected_lock:
            self._rejected.append(RejectedRecord(kind, execution_id, node_id, bytes(payload),
                                                 reason, time.time()))

    def rejected(self, limit: int = 100) -> list[RejectedRecord]:
        check_limit(limit)
        with self._rejected_lock:
            return list(reversed(self._rejected))[:limit]
