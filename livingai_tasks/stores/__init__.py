"""Stores, chosen by URL with open_store(url).

    sqlite:///relative.db  sqlite:////abs/path.db    the embedded default (file, WAL)
    postgresql+psycopg://user@host:5432/db            durable, queryable (also postgresql://)
    redis://host:6379/0?prefix=lai  rediss://...      hot, shared by the fleet
    tiered+redis://host:6379/0?durable=<url-encoded postgresql url>
                                                       Redis hot tier over PostgreSQL
    memory://                                          unit tests only: one process, not durable

Every store implements the Store protocol; some also offer optional capabilities, each a
Protocol of its own (AppendsIfNew, WritesBeforeEntry, SweepsHotTier, TracksWorkers,
SetsAside, KeepsSideRecords): see base.py and
stores/README.md. Every store fences its writes (Fenced, if_fence, claim): see base.py.
"""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from ..errors import ConfigError
from ._common import mask_url
from .base import (
    EXECUTION_FIELDS,
    IF_FENCE,
    AppendsIfNew,
    Fenced,
    KeepsSideRecords,
    ListsWorkers,
    SetsAside,
    Store,
    SweepsHotTier,
    TracksWorkers,
    WorkerRecord,
    WritesBeforeEntry,
    fence_of,
)

__all__ = ["Store", "AppendsIfNew", "WritesBeforeEntry", "SweepsHotTier", "TracksWorkers",
           "ListsWorkers", "SetsAside", "KeepsSideRecords", "Fenced",
           "WorkerRecord", "fence_of", "IF_FENCE", "open_store", "EXECUTION_FIELDS",
           "mask_url", "ACCEPTED_SCHEMES"]

ACCEPTED_SCHEMES = (
    "sqlite:///<path>, postgresql+psycopg://user@host/db, redis://, rediss://, "
    "tiered+redis://host/db?durable=<postgresql url>, memory://"
)


def open_store(url: str) -> Store:
    """Build the store a URL names. Nothing connects until first use (safe before fork)."""
    if not isinstance(url, str) or "://" not in url:
        raise ConfigError(f"Store URL must be a string like 'sqlite:///agents.db', got {url!r}. "
                          f"Accepted: {ACCEPTED_SCHEMES}.")
    scheme = urlsplit(url).scheme.lower()
    if scheme == "memory":
        from .memory import MemoryStore

        return MemoryStore(url)
    if scheme in ("sqlite", "postgresql", "postgresql+psycopg", "postgres"):
        from .sql import SQLStore

        return SQLStore(url)
    if scheme in ("redis", "rediss"):
        from .redis import RedisStore

        return RedisStore(url)
    if scheme in ("tiered+redis", "tiered+rediss"):
        from .tiered import TieredStore

        query = parse_qs(urlsplit(url).query)
        durable = query.get("durable", [None])[0]
        if not durable:
            raise ConfigError(
                f"Tiered store URL {mask_url(url)!r} needs ?durable=<postgresql url> "
                "(URL-encoded), e.g. tiered+redis://127.0.0.1:6379/0?durable="
                "postgresql%2Bpsycopg%3A%2F%2Fpostgres%40127.0.0.1%2Ftest"
            )
        return TieredStore(url)
    raise ConfigError(
        f"Unsupported store URL scheme {scheme!r} in {mask_url(url)!r}. "
        f"Expected {ACCEPTED_SCHEMES}."
    )
