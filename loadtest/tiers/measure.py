"""measure(): one row of a checkpoint tier. A Plan runs on a fresh store of a kind with our
engine, then (with the baseline on) on another with livingai 0.4.1's, and both are read
back from one fresh process; in a burst our save's CPU alone runs through the same threads.
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any

from ..core.context import RunContext
from ..core.stats import percentile
from . import baseline, ours
from .figures import compute, compute_floor, ratios
from .plan import Plan, growing
from .readback import read_back
from .runs import RunRecord
from .targets import LIVINGAI_KINDS, provision

__all__ = ["measure", "measure_paces"]


def measure(
    ctx: RunContext,
    workload: str,
    kind: str,
    plan: Plan,
    *,
    row: str = "",
    ours_kwargs: dict[str, Any] | None = None,
    livingai_kwargs: dict[str, Any] | None = None,
    hot_reads: int = 0,
) -> dict[str, Any]:
    """The row of `plan` on `kind` (see core/context.py for its shape). A failure is
    recorded in the row as "<impl>_error" (and printed), so one broken store or engine does
    not lose the other figures."""
    out: dict[str, Any] = {"store": kind, "ours": None, "livingai": None}
    label = f"{workload} {kind}{' ' + row if row else ''}"
    impls = ["ours"]
    if not ctx.baseline:
        out["livingai_note"] = "baseline not run (--no-baseline)"
    elif kind not in LIVINGAI_KINDS:
        out["livingai_note"] = f"livingai 0.4.1 has no {kind} store"
    else:
        impls.append("livingai")
    records: dict[str, RunRecord] = {}
    try:
        with ExitStack() as stack:
            targets = {impl: stack.enter_context(provision(
                ctx, kind, impl, ctx.namespace(workload, kind, impl, row))) for impl in impls}
            for impl, target in targets.items():
                try:
                    with ctx.progress.task(f"{label} {impl}", plan.total) as task:
                        if impl == "ours":
                            records[impl] = ours.run_plan(
                                target.url, plan, target.ns, task,
                                engine_kwargs={**ctx.engine_kwargs, **(ours_kwargs or {})},
                                hot_reads=hot_reads)
                        else:
                            records[impl] = baseline.run_plan(
                                target.spec, plan, target.ns, task, hot_reads=hot_reads,
                                **(livingai_kwargs or {}))
                except Exception as exc:  # noqa: BLE001 - reported, the run goes on
                    out[f"{impl}_error"] = ctx.failed(f"{label} {impl}", exc)
            if records:
                with ctx.progress.task(f"{label} readback", 1) as task:
                    readbacks = read_back([(impl, targets[impl].spec,
                                            plan.job(targets[impl].ns)) for impl in records])
                    task.advance()
                for impl, record in records.items():
                    out[impl] = compute(record, readbacks[impl])
    except Exception as exc:  # noqa: BLE001 - provisioning or cleanup failed
        out["ours_error" if "ours" not in records else "cleanup_error"] = ctx.failed(label, exc)
    if out["ours"] and out["livingai"]:
        out["ratio"] = ratios(out["ours"], out["livingai"])
    if plan.think_s <= 0 and plan.agents > 1 and "ours" in records:  # a burst
        out["floor"] = _floor(ctx, label, plan, records["ours"],
                              ctx.namespace(workload, kind, "floor", row))
    return out


def _floor(ctx: RunContext, label: str, plan: Plan, record: RunRecord,
           ns: str) -> dict[str, Any] | None:
    """In a burst, the same threads with a save that only burns our save's median CPU
    time: the share of that held past the budget is the GIL's, not the engine's."""
    cpu = percentile([s.cpu_ms for s in record.samples if s.cpu_ms is not None], 50)
    if cpu is None:
        return None
    try:
        with ctx.progress.task(f"{label} cpu-only save", plan.total) as task:
            floor = ours.run_floor(plan, ns, task, cpu)
        return {**compute_floor(floor), "cpu_ms": cpu}
    except Exception as exc:  # noqa: BLE001 - reported, the run goes on
        ctx.failed(f"{label} cpu-only save", exc)
        return None


def measure_paces(ctx: RunContext, workload: str, description: str, *, agents: int, steps: int,
                  first: int, last: int, paces: dict[str, float]) -> dict[str, Any]:
    """A tier of agents whose states grow from `first` to `last` bytes, run at each pace
    (mean think time between checkpoints, s; a tenth of it in a quick run) on every store:
    the workload's whole result."""
    think_scale = 0.1 if ctx.quick else 1.0
    base = growing(workload, agents=agents, steps=steps, first=first, last=last)
    plans = {pace: base.paced(f"{workload}-{pace}", think_s * think_scale)
             for pace, think_s in paces.items()}
    rows = {f"{kind} {pace}": measure(ctx, workload, kind, plan, row=pace)
            for kind in ctx.stores or () for pace, plan in plans.items()}
    return {
        "description": description,
        "params": {"agents": agents, "checkpoints": base.total, "first_state_bytes": first,
                   "last_state_bytes": last, "mean_state_bytes": round(base.mean_size),
                   "think_s": {pace: p.think_s for pace, p in plans.items()}},
        "rows": rows,
    }
