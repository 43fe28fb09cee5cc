"""Workload 2 — production: 50 concurrent agents, 1000 checkpoints, states 5 KB -> 100 KB.

The agents are threads of one process sharing one engine (ours), as in a Celery worker with
the threads pool; for livingai they are tasks on one event loop, as in an async agent host.

Each store runs three times with the same checkpoints:
  paced  every agent thinks (its LLM call, its tool) between two checkpoints, uniformly
         0.5-1.5 s (1 s on average), and the agents start staggered: a production load;
  busy   15-45 ms between checkpoints (30 ms on average): agents whose steps are quick
         local tools, no model call; about 1200 saves/s. The load where livingai 0.4.1
         starts to miss its budget on many saves (loadtest/README.md);
  burst  every agent saves back to back: the engine's saturation point, not a load any
         real agent produces, but where queueing and contention show.
"""

from __future__ import annotations

from typing import Any

from ..core.context import RunContext
from ..core.state import KB
from .measure import measure_paces

NAME = "production"
DESCRIPTION = ("50 concurrent agents, 1000 checkpoints of states growing 5 KB -> 100 KB, "
               "paced (1 s think time), busy (30 ms) and burst: budget, hold, durability, "
               "recovery")

PACES = {"paced": 1.0, "busy": 0.03, "burst": 0.0}  # mean think time between checkpoints, s


def run(ctx: RunContext) -> dict[str, Any]:
    agents, steps = (10, 5) if ctx.quick else (50, 20)
    return measure_paces(ctx, NAME, DESCRIPTION, agents=agents, steps=steps, first=5 * KB,
                         last=100 * KB, paces=PACES)
