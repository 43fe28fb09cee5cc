"""Per-call overhead of journaling, on a live fleet: each round runs every agent kind once
journaled and once plain, each run its own execution (one step on a real worker), the two in
alternating order from round to round so that a drift of the machine's load falls on both.

Per model call (a segment from one call to the next, agents.py's probe): wall time and the
worker process's CPU time (time.process_time: every thread of the pool process, so the
journal's writer thread is in it), median and p99 over every call of every round, and the
median of each round, whose spread over the rounds says how far to trust a difference. Per
run: wall and CPU of the run plus the flush after it (until the write-behind reached the
store), divided by the calls: what a call costs all told, the writes included.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

import livingai_tasks as lai

from ..core.context import RunContext
from ..core.stats import percentile, spread
from .app import Steps
from .config import Config

__all__ = ["run_overhead", "summarise"]


def _one(steps: Steps, client: redis.Redis, key: str, kind: str, journaled: bool, calls: int,
         timeout_s: float) -> dict[str, Any]:
    sample = uuid.uuid4().hex[:12]
    lai.start(steps.overhead.s(kind, journaled, calls, sample))
    got = client.blpop([key], timeout=int(timeout_s))
    if got is None:
        raise TimeoutError(f"no timings from the {kind} agent run "
                           f"({'journaled' if journaled else 'plain'}) after {timeout_s:.0f}s")
    found: dict[str, Any] = json.loads(got[1])
    if found["sample"] != sample:
        raise RuntimeError(f"timings of run {found['sample']} came while waiting for {sample}: "
                           "runs overlapped (another driver on the same prefix?)")
    if not found["flushed"]:
        raise RuntimeError(f"the {kind} agent run {sample}'s journal did not reach the store "
                           "within 30 s of the run's end")
    return found


def run_overhead(ctx: RunContext, cfg: Config, steps: Steps, client: redis.Redis,
                 key: str, label: str) -> dict[str, Any]:
    """Every round on the fleet; per agent kind, the runs of each mode in round order."""
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        k: {"journaled": [], "plain": []} for k in cfg.agents}
    # A warm-up run of each (imports, connections, the first store read of a process), not
    # counted: both workers of the fleet may take runs, so two of each.
    for kind in cfg.agents:
        for journaled in (True, False, True, False):
            _one(steps, client, key, kind, journaled, cfg.calls, cfg.run_timeout_s)
    total = cfg.rounds * len(cfg.agents) * 2
    began = time.monotonic()
    with ctx.progress.task(f"{label} overhead", total) as bar:
        for r in range(cfg.rounds):
            for kind in cfg.agents:
                for journaled in ((True, False) if r % 2 == 0 else (False, True)):
                    got = _one(steps, client, key, kind, journaled, cfg.calls,
                               cfg.run_timeout_s)
                    runs[kind]["journaled" if journaled else "plain"].append(got)
                    bar.advance()
    return {"wall_s": time.monotonic() - began,
            "agents": {k: summarise(v, cfg.calls) for k, v in runs.items()}}


def _calls(runs: list[dict[str, Any]], what: str) -> dict[str, Any]:
    values = [v for run in runs for v in run[what]]
    return {"n": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": max(values)}


def _per_call(run: dict[str, Any], what: str, calls: int) -> float:
    """Wall or CPU ms per call of the whole run, the flush after it included."""
    return float(run[f"run_{what}_ms"] + run[f"flush_{what}_ms"]) / calls


def summarise(runs: dict[str, list[dict[str, Any]]], calls: int) -> dict[str, Any]:
    """One agent kind's figures: per call, per round, and journaled minus plain."""
    journaled, plain = runs["journaled"], runs["plain"]
    out: dict[str, Any] = {}
    for mode, got in (("journaled", journaled), ("plain", plain)):
        out[mode] = {"call_wall_ms": _calls(got, "call_wall_ms"),
                     "call_cpu_ms": _calls(got, "call_cpu_ms"),
                     "run_wall_per_call_ms": spread([_per_call(r, "wall", calls) for r in got]),
                     "run_cpu_per_call_ms": spread([_per_call(r, "cpu", calls) for r in got]),
                     "flush_wall_ms": spread([r["flush_wall_ms"] for r in got]),
                     # The first call of a journaled run reads the store once (has an
                     # earlier attempt recorded calls?): apart, it shows in the p99.
                     "first_call_wall_ms": spread([r["call_wall_ms"][0] for r in got]),
                     "later_calls_wall_ms": _calls([{"w": r["call_wall_ms"][1:]} for r in got],
                                                   "w")}
    added: dict[str, Any] = {}
    for what in ("wall", "cpu"):
        j, p = out["journaled"][f"call_{what}_ms"], out["plain"][f"call_{what}_ms"]
        added[f"call_{what}_p50_ms"] = j["p50"] - p["p50"]
        added[f"call_{what}_p99_ms"] = j["p99"] - p["p99"]
        # Round by round (the runs of a round ran back to back): the spread of the added
        # median, and of the added whole-run cost per call.
        added[f"round_{what}_p50_ms"] = spread([
            (percentile(a[f"call_{what}_ms"], 50) or 0.0)
            - (percentile(b[f"call_{what}_ms"], 50) or 0.0)
            for a, b in zip(journaled, plain, strict=True)])
        added[f"round_{what}_per_call_ms"] = spread([
            _per_call(a, what, calls) - _per_call(b, what, calls)
            for a, b in zip(journaled, plain, strict=True)])
        added[f"{what}_ratio"] = (
            out["journaled"][f"run_{what}_per_call_ms"]["median"]
            / out["plain"][f"run_{what}_per_call_ms"]["median"])
    out["added"] = added
    out["runs"] = {"journaled": len(journaled), "plain": len(plain), "calls_per_run": calls,
                   "pids": sorted({r["pid"] for r in journaled + plain})}
    return out
