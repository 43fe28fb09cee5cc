"""Workload 3 — hyperscale: 150 concurrent agents, 1500 checkpoints of ~0.77 MB states.

Same shape as production (threads sharing one engine; livingai: tasks on one loop; paced
with 1 s think time, and burst; no busy pace: at 30 ms between 0.77 MB checkpoints it would
be a second burst), with states big enough that encoding dominates: each
agent's state grows from 0.72 MB to 0.82 MB (0.77 MB on average). Adds total time and the
CPU time spent encoding.
"""

from __future__ import annotations

from typing import Any

from ..core.context import RunContext
from ..core.state import MB
from .measure import measure_paces

NAME = "hyperscale"
DESCRIPTION = ("150 concurrent agents, 1500 checkpoints of ~0.77 MB states, paced and burst: "
               "budget, hold, durability, total time, encode CPU")

FIRST = int(0.72 * MB)
LAST = int(0.82 * MB)
PACES = {"paced": 1.0, "burst": 0.0}  # mean think time between checkpoints, s


def run(ctx: RunContext) -> dict[str, Any]:
    agents, steps = (15, 4) if ctx.quick else (150, 10)
    return measure_paces(ctx, NAME, DESCRIPTION, agents=agents, steps=steps, first=FIRST,
                         last=LAST, paces=PACES)
