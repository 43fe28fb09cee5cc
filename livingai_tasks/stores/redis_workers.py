"""The Redis store's worker liveness records (TracksWorkers).

A mixin of RedisStore, kept apart so redis.py stays about nodes and executions. Layout: one
hash of JSON records by worker name (RedisKeys.workers) and one sorted set of their deadlines
(RedisKeys.worker_expiry), so the dead ones are a ZRANGEBYSCORE.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, cast

from ..errors import RecordError
from ..nodes import dumps_json
from ._common import check_page
from .base import WorkerRecord, check_counters
from .redis_layout import RedisKeys

__all__ = ["RedisWorkers"]

log = logging.getLogger("livingai_tasks.stores")


def _record(worker: str, raw: bytes) -> WorkerRecord:
    try:
        data = json.loads(raw)
        return WorkerRecord(worker, float(data["expires_at"]), tuple(data["owners"]),
                            tuple(data["holding"]),
                            check_counters(data.get("counters"), worker))
    except (ValueError, KeyError, TypeError) as exc:
        raise RecordError(f"Stored liveness record of worker {worker!r} is malformed: "
                          f"{exc}") from exc


def _readable(worker: str, raw: bytes) -> WorkerRecord | None:
    """A listing skips a malformed record (logged), so one bad record hides no other."""
    try:
        return _record(worker, raw)
    except RecordError as exc:
        log.warning("livingai_tasks: skipping worker record %r: %s", worker, exc)
        return None


class RedisWorkers:
    """TracksWorkers for RedisStore (which provides keys and _talking)."""

    keys: RedisKeys

    def _talking(self) -> AbstractContextManager[Any]:
        raise NotImplementedError  # RedisStore's

    def beat_worker(self, worker: str, *, expires_at: float, owners: Sequence[str],
                    holding: Sequence[str], counters: Mapping[str, float] | None = None
                    ) -> None:
        """Replace the worker's record and deadline in one MULTI/EXEC round trip."""
        record = dumps_json({"expires_at": float(expires_at), "owners": list(owners),
                             "holding": list(holding),
                             "counters": check_counters(counters, worker)},
                            what=f"Worker {worker} record")
        with self._talking() as conn:
            pipe = conn.client.pipeline(transaction=True)
            pipe.hset(self.keys.workers, worker, record)
            pipe.zadd(self.keys.worker_expiry, {worker: float(expires_at)})
            pipe.execute()

    def dead_workers(self, now: float, limit: int = 100) -> list[WorkerRecord]:
        """Workers whose expires_at < now, oldest deadline first."""
        check_page(limit, 0)
        with self._talking() as conn:
            names = cast("list[bytes]", conn.client.zrangebyscore(
                self.keys.worker_expiry, "-inf", f"({float(now)!r}", start=0, num=limit))
            raws = cast("list[bytes | None]",
                        conn.client.hmget(self.keys.workers, names)) if names else []
        found = [_record(n.decode(), raw) for n, raw in zip(names, raws, strict=True) if raw]
        # A beat may land between the two reads: keep only what is still expired.
        return [w for w in found if w.expires_at < now]

    def workers(self, limit: int = 1000) -> list[WorkerRecord]:
        """Every record, by name (HSCAN: no single call blocks Redis on a big fleet)."""
        check_page(limit, 0)
        with self._talking() as conn:
            raws = sorted(cast("Iterator[tuple[bytes, bytes]]",
                               conn.client.hscan_iter(self.keys.workers, count=500)))
        return [r for r in (_readable(name.decode(), raw) for name, raw in raws[:limit]) if r]

    def worker(self, worker: str) -> WorkerRecord | None:
        with self._talking() as conn:
            raw = cast("bytes | None", conn.client.hget(self.keys.workers, worker))
        return None if raw is None else _record(worker, raw)

    def forget_worker(self, worker: str) -> None:
        with self._talking() as conn:
            pipe = conn.client.pipeline(transaction=True)
            pipe.hdel(self.keys.workers, worker)
            pipe.zrem(self.keys.worker_expiry, worker)
            pipe.execute()
