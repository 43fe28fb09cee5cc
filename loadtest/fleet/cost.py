"""What a fleet batch cost, besides its wall time: the CPU of each part of the machine
(the variant's pool children and worker main processes, Redis, PostgreSQL, the publisher)
and the bytes the store grew by.

The CPU comes from /proc (core/process_cpu.py), so it is each process's own time, not the
machine's busy time: other jobs' processes do not count, but their use of the shared
servers does (run it on a quiet machine). Redis serves the broker and results of every
variant too: the difference between variants is what the store costs.
"""

from __future__ import annotations

import os

from ..core.footprint import footprint, total_bytes
from ..core.process_cpu import PartsClock, pids_named
from ..core.servers import Servers
from .processes import Fleet, Namespace, children_of

__all__ = ["PARTS", "WORKER_PARTS", "batch_clock", "store_bytes"]

# The worker processes in two parts: their pool children (the steps, our signal handlers
# and writer threads) and their main processes (Celery's consumer, our liveness thread).
PARTS = ("pool", "main", "redis", "postgres", "publisher")
WORKER_PARTS = ("pool", "main")


def _main_pids(fleet: Fleet) -> list[int]:
    return [proc.pid for proc in fleet.procs if proc.alive()]


def _pool_pids(fleet: Fleet) -> list[int]:
    return [child for pid in _main_pids(fleet) for child in children_of(pid)]


def batch_clock(fleet: Fleet) -> PartsClock:
    """A clock of PARTS for a batch run by `fleet`, published from this process."""
    return PartsClock({"pool": lambda: _pool_pids(fleet), "main": lambda: _main_pids(fleet),
                       "redis": lambda: pids_named("redis-server"),
                       "postgres": lambda: pids_named("postgres"),
                       "publisher": lambda: [os.getpid()]})


def store_bytes(servers: Servers, ns: Namespace, kind: str, url: str) -> int:
    """The store's footprint now, in bytes (core/footprint.py; tiered: both tiers)."""
    return total_bytes(footprint(kind, redis_url=servers.redis_url,
                                 postgres_url=servers.postgres_url, name=ns.store_name(kind),
                                 store_url=url))
