"""Workload 1 — one agent, two state sizes.

  * 500 checkpoints of a 250 KB state on an engine whose hot cache holds 4 entries, so
    nearly every save evicts one (the cache cannot hide anything: reads of old nodes go to
    the store, and the cache's bookkeeping is on the save path);
  * 2000 checkpoints of a 50 KB state on a default engine.

Per size: the hold the agent feels (p50/p95/p99), time to durable, a hot read (engine.load
of the newest node, cached) and, from a fresh process, a cold read and a full readback.
"""

from __future__ import annotations

from typing import Any

from ..core.context import RunContext
from ..core.state import KB
from .measure import measure
from .plan import uniform

NAME = "single"
DESCRIPTION = ("one agent: 500 x 250 KB with a 4-entry hot cache (forced evictions), "
               "2000 x 50 KB; hold, time to durable, hot and cold reads")

TINY_CACHE = 4
HOT_READS = 200


def run(ctx: RunContext) -> dict[str, Any]:
    scale = 10 if ctx.quick else 1
    big = uniform("single-250KB", agents=1, steps=500 // scale, size=250 * KB)
    small = uniform("single-50KB", agents=1, steps=2000 // scale, size=50 * KB)
    rows: dict[str, Any] = {}
    for kind in ctx.stores or ():
        rows[f"{kind} 250KB"] = measure(
            ctx, NAME, kind, big, row="250k", hot_reads=HOT_READS,
            ours_kwargs={"cache_entries": TINY_CACHE},
            livingai_kwargs={"hot_capacity": TINY_CACHE})
        rows[f"{kind} 50KB"] = measure(ctx, NAME, kind, small, row="50k",
                                       hot_reads=HOT_READS)
    return {
        "description": DESCRIPTION,
        "params": {"250KB": {"checkpoints": big.total, "state_bytes": 250 * KB,
                             "cache_entries": TINY_CACHE},
                   "50KB": {"checkpoints": small.total, "state_bytes": 50 * KB},
                   "hot_reads": HOT_READS},
        "rows": rows,
    }
