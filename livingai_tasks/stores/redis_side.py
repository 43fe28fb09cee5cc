"""The Redis store's side records (KeepsSideRecords).

A mixin of RedisStore, kept apart so redis.py stays about nodes and executions. Layout: one
hash per group (RedisKeys.side_group) and one set of a space's groups (RedisKeys.side_space);
a group leaves the set in the same script that empties its hash, so the set never names an
empty group for long nor misses a group that holds records.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

from .redis_layout import RedisKeys

__all__ = ["RedisSideRecords"]

# KEYS: group hash, space set; ARGV: group, then keys to delete. Deletes, and drops the
# group from the space's set once its hash is empty, atomically against a concurrent put.
_DELETE = """
if #ARGV > 1 then redis.call('HDEL', KEYS[1], unpack(ARGV, 2)) else redis.call('DEL', KEYS[1]) end
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('SREM', KEYS[2], ARGV[1]) end
return 0
"""


_SLICE = 1000


class RedisSideRecords:
    """KeepsSideRecords for RedisStore (which provides keys and _talking)."""

    keys: RedisKeys

    def _talking(self) -> AbstractContextManager[Any]:
        raise NotImplementedError  # RedisStore's

    def side_get(self, space: str, group: str) -> dict[str, bytes]:
        with self._talking() as conn:
            raw = conn.client.hgetall(self.keys.side_group(space, group))
        return {k.decode(): bytes(v) for k, v in raw.items()}

    def side_put(self, space: str, group: str, records: Mapping[str, bytes], *,
                 replace: bool = True) -> None:
        if not records:
            return
        key = self.keys.side_group(space, group)
        with self._talking() as conn:
            pipe = conn.client.pipeline(transaction=True)
            if replace:
                pipe.hset(key, mapping=dict(records))
            else:
                for k, v in records.items():
                    pipe.hsetnx(key, k, v)
            pipe.sadd(self.keys.side_space(space), group)
            pipe.execute()

    def side_delete(self, space: str, group: str, keys: Sequence[str] | None = None) -> None:
        if keys is not None and not keys:
            return
        # In slices: a Lua call's arguments are bounded (unpack), a pruned thread's keys not.
        slices = [()] if keys is None else [tuple(keys[i:i + _SLICE])
                                           for i in range(0, len(keys), _SLICE)]
        with self._talking() as conn:
            for part in slices:
                conn.client.eval(_DELETE, 2, self.keys.side_group(space, group),
                                 self.keys.side_space(space), group, *part)

    def side_groups(self, space: str) -> list[str]:
        with self._talking() as conn:
            found: Iterator[bytes] = iter(conn.client.smembers(self.keys.side_space(space)))
            return sorted(g.decode() for g in found)
