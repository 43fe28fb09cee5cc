"""Workload 3 — hyperscale: 150 concurrent agents, 1500 checkpoints of ~0.77 MB states.

Same shape as production (threads sharing one engine; livingai: tasks on one loop; paced
with 1 s think time, and burst; no busy pace: at 30 ms between 0.77 MB checkpoints it would
be a second burst), with states big enough that encoding dominates: each
agent's state grows from 0.72 MB to 0.82 MB (0.77 MB on average). Adds total time and the
CPU time spent encoding.
"""

from __future__ import annotations

from typing import Any

from .context import RunContext
from .plan import growing
from .state import MB

NAME = "hyperscale"
DESCRIPTION = ("150 concurrent agents, 1500 checkpoints of ~0.77 MB states, paced and burst: "
               "budget, hold, durability, total time, encode CPU")

FIRST = int(0.72 * MB)
LAST = int(0.82 * MB)
MODES = {"paced": 1.0, "burst": 0.0}  # mean think time between checkpoints, s


def run(ctx: RunContext) -> dict[str, Any]:
    agents, steps = (15, 4) if ctx.quick else (150, 10)
    think_scale = 0.1 if ctx.quick else 1.0
    base = growing("hyperscale", agents=agents, steps=steps, first=FIRST, last=LAST)
    plans = {mode: base.paced(f"hyperscale-{mode}", think_s * think_scale)
             for mode, think_s in MODES.items()}
    rows: dict[str, Any] = {}
    for kind in ctx.stores:
        for mode, plan in plans.items():
            rows[f"{kind} {mode}"] = ctx.measure(NAME, kind, plan, row=mode)
    plan = plans["paced"]
    return {
        "description": DESCRIPTION,
        "params": {"agents": agents, "checkpoints": plan.total, "first_state_bytes": FIRST,
                   "last_state_bytes": LAST, "mean_state_bytes": round(plan.mean_size),
                   "think_s": {mode: p.think_s for mode, p in plans.items()}},
        "rows": rows,
    }
