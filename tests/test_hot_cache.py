"""HotCache: LRU by entries and bytes, TTL, the newest checkpoint per execution (pure logic)."""

from __future__ import annotations

import pytest

from livingai_tasks import Status
from livingai_tasks.engine import HotCache

from .engine_support import node

pytestmark = pytest.mark.timeout(60)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hot_cache_evicts_least_recently_used_by_entries() -> None:
    cache = HotCache(max_entries=2, max_bytes=10**9, ttl_s=60)
    a, b, c = node(seq=1), node(seq=2), node(seq=3)
    cache.put(a, 10)
    cache.put(b, 10)
    assert cache.get(a.id) == a  # a is now the most recently used
    assert cache.put(c, 10) == 1
    assert cache.get(b.id) is None
    assert cache.get(a.id) == a and cache.get(c.id) == c
    assert cache.entries == 2


def test_hot_cache_evicts_by_bytes() -> None:
    cache = HotCache(max_entries=100, max_bytes=25_000, ttl_s=60)
    a = node(seq=1, checkpoint=b"\x00" + bytes(10_000))
    b = node(seq=2, checkpoint=b"\x00" + bytes(10_000))
    c = node(seq=3, checkpoint=b"\x00" + bytes(10_000))
    cache.put(a, 100)
    cache.put(b, 100)
    assert cache.bytes == 2 * (10_001 + 100 + HotCache.OVERHEAD)
    cache.put(c, 100)
    assert cache.get(a.id) is None and cache.get(b.id) == b and cache.get(c.id) == c
    assert cache.bytes <= 25_000
    # A version bigger than the whole cache is not held, and neither is its older version.
    huge = b.evolve(checkpoint=b"\x00" + bytes(30_000))
    cache.put(huge, 100)
    assert cache.get(b.id) is None
    assert cache.latest_checkpoint("e1") == c


def test_hot_cache_expires_by_ttl() -> None:
    clock = FakeClock()
    cache = HotCache(max_entries=10, max_bytes=10**9, ttl_s=5, clock=clock)
    a = node(checkpoint=b"\x00s")
    cache.put(a, 10)
    clock.now += 4.9
    assert cache.get(a.id) == a  # reading does not extend the TTL
    clock.now += 0.2
    assert cache.get(a.id) is None
    assert cache.latest_checkpoint("e1") is None
    assert cache.entries == 0 and cache.bytes == 0


def test_hot_cache_keeps_the_checkpoint_when_a_newer_version_has_none() -> None:
    cache = HotCache(max_entries=10, max_bytes=10**9, ttl_s=60)
    with_blob = node(checkpoint=b"\x00state")
    cache.put(with_blob, 10)
    done = with_blob.evolve(status=Status.SUCCESS, checkpoint=None)
    cache.put(done, 10)
    assert cache.get(done.id) == done
    assert cache.latest_checkpoint("e1") == with_blob


def test_fill_gives_the_cached_version_its_blob_unless_a_newer_one_came() -> None:
    cache = HotCache(max_entries=10, max_bytes=10**9, ttl_s=60)
    pending = node()  # queued raw: the writer compresses it later
    cache.put(pending, 10)
    encoded = pending.evolve(checkpoint=b"\x00state")
    cache.fill(pending, encoded, 10)
    assert cache.get(pending.id) == encoded
    assert cache.latest_checkpoint("e1") == encoded
    # A newer version was cached meanwhile: a late fill of the old one must not replace it.
    newer = pending.evolve(status=Status.RUNNING)
    cache.put(newer, 10)
    cache.fill(pending, pending.evolve(checkpoint=b"\x00old"), 10)
    assert cache.get(pending.id) == newer
