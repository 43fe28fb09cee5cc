"""The tiered store's PostgreSQL tier: the SQL store plus its record of missed Redis keys.

A process that could not delete a key from Redis before writing PostgreSQL (Redis
unreachable from it) records the key in `lai_tier_missed` (sql_schema.TIER_MISSED, schema
version 2) first, so that the record outlives the process; whoever reaches Redis next
deletes the keys, then the records (tiered.py). Only the tiered store uses this table: the
plain SQL store never reads or writes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import sqlalchemy as sa

from ..nodes import utcnow
from .sql import SQLStore
from .sql_schema import TIER_MISSED

__all__ = ["DurableTier", "DurableSideRecords"]


class DurableTier(SQLStore):
    """A PostgreSQL SQLStore that also keeps the Redis tier's missed keys, per key prefix."""

    def record_missed(self, prefix: str, *, nodes: Iterable[str] = (),
                      checkpoints: Iterable[str] = ()) -> None:
        """Record keys of the Redis tier with key prefix `prefix` that may hold a stale copy."""
        now = utcnow()
        rows = [{"prefix": prefix, "kind": kind, "key": key, "recorded_at": now}
                for kind, keys in (("node", nodes), ("checkpoint", checkpoints))
                for key in sorted(set(keys))]
        if rows:
            with self._transaction(write=True) as conn:
                conn.execute(TIER_MISSED.insert(), rows)

    def missed(self, prefix: str, *, limit: int) -> list[tuple[int, str, str]]:
        """The oldest `limit` records for `prefix`, as (record id, kind, key)."""
        query = (sa.select(TIER_MISSED.c.id, TIER_MISSED.c.kind, TIER_MISSED.c.key)
                 .where(TIER_MISSED.c.prefix == prefix).order_by(TIER_MISSED.c.id).limit(limit))
        with self._transaction(write=False) as conn:
            return [(int(i), str(kind), str(key)) for i, kind, key in conn.execute(query)]

    def drop_missed(self, ids: Sequence[int]) -> None:
        """Delete records whose keys are gone from Redis."""
        if ids:
            with self._transaction(write=True) as conn:
                conn.execute(TIER_MISSED.delete().where(TIER_MISSED.c.id.in_(list(ids))))


class DurableSideRecords:
    """KeepsSideRecords for TieredStore: side records live in PostgreSQL only. They are an
    adapter's own state, read whole per group and rarely hot, so the Redis tier keeps no
    copy (one place of record, nothing to evict after an outage)."""

    durable: DurableTier

    def side_get(self, space: str, group: str) -> dict[str, bytes]:
        return self.durable.side_get(space, group)

    def side_put(self, space: str, group: str, records: Mapping[str, bytes], *,
                 replace: bool = True) -> None:
        self.durable.side_put(space, group, records, replace=replace)

    def side_delete(self, space: str, group: str, keys: Sequence[str] | None = None) -> None:
        self.durable.side_delete(space, group, keys)

    def side_groups(self, space: str) -> list[str]:
        return self.durable.side_groups(space)
