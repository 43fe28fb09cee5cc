"""Kill an agent after its 10th model call and time its resume, on a live fleet.

Per agent kind: first one run that is not killed (its output and tokens are what every
resumed run must end with). Then each run: the journaled agent of `resume_calls` model calls
starts; its model blocks at the start of call `kill_after + 1` (before counting it, so the
killed attempt made exactly `kill_after` calls); once the store holds the `kill_after`
calls as recorded (model requests, and for Pydantic AI the tool calls between them), the
worker running it is SIGKILLed, main process and pool child. The other worker and the
recovery tick (beat) resume it. Figures: from the kill to the body starting again, and to it
finishing; model calls per turn (a repeated one is a recorded call the resumed run made
again: target 0); the output and the token totals against the uncrashed run's. The killed
worker is then started again, as a supervisor would, before the next run.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import redis

import livingai_tasks as lai

from ..core.library import recorded_calls, token_totals
from ..core.stats import percentile, spread
from ..fleet.processes import Fleet, Proc, children_of, wait_for
from .app import Steps
from .config import Config

__all__ = ["run_resumes"]


def _succeeded(store: Any, eid: str) -> int:
    return sum(n.status is lai.Status.SUCCESS for n in recorded_calls(store.nodes(eid)))


def _finished(client: redis.Redis, keys: dict[str, str], run_id: str,
              timeout_s: float) -> dict[str, Any]:
    raw = wait_for(lambda: client.get(f"{keys['done']}:{run_id}"), timeout_s,
                   f"agent run {run_id} to finish")
    found: dict[str, Any] = json.loads(raw)
    return found


def _completed(store: Any, eid: str, timeout_s: float) -> None:
    wait_for(lambda: (ex := store.get_execution(eid)) is not None
             and ex.status is lai.ExecutionStatus.COMPLETED, timeout_s,
             f"execution {eid} to be COMPLETED")


def _tokens(store: Any, eid: str) -> dict[str, int]:
    found = token_totals(store.nodes(eid))
    return {k: found[k] for k in ("calls", "input_tokens", "output_tokens", "total_tokens")}


def _reference(cfg: Config, steps: Steps, client: redis.Redis, keys: dict[str, str],
               store: Any, kind: str) -> dict[str, Any]:
    run_id = f"ref-{kind}-{uuid.uuid4().hex[:8]}"
    t0 = time.time()
    eid = lai.start(steps.resume.s(kind, run_id, cfg.resume_calls, -1)).execution_id
    done = _finished(client, keys, run_id, cfg.run_timeout_s)
    _completed(store, eid, cfg.run_timeout_s)
    return {"output": done["output"], "tokens": _tokens(store, eid),
            "run_s": done["at"] - t0}


def _victim(workers: list[Proc], pid: int) -> Proc:
    for proc in workers:
        if pid == proc.pid or pid in children_of(proc.pid):
            return proc
    raise RuntimeError(f"no worker of the fleet runs pid {pid}")


def _one(cfg: Config, fleet: Fleet, workers: list[Proc], steps: Steps, client: redis.Redis,
         keys: dict[str, str], store: Any, kind: str, ref: dict[str, Any]) -> dict[str, Any]:
    run_id = f"{kind}-{uuid.uuid4().hex[:8]}"
    eid = lai.start(steps.resume.s(kind, run_id, cfg.resume_calls, cfg.kill_after)).execution_id
    pid = int(wait_for(lambda: client.get(f"{keys['paused']}:{run_id}"), cfg.run_timeout_s,
                       f"run {run_id} to reach model call {cfg.kill_after + 1}"))
    # Model requests, and for Pydantic AI the tool call after each one.
    recorded = cfg.kill_after * (2 if kind == "pydantic" else 1)
    waited = time.time()
    wait_for(lambda: _succeeded(store, eid) >= recorded, 30,
             f"the first {recorded} calls of run {run_id} to be recorded", step_s=0.01)
    victim = _victim(workers, pid)
    victim.kill_main()
    killed = victim.killed_at
    done = _finished(client, keys, run_id, cfg.run_timeout_s)
    _completed(store, eid, cfg.run_timeout_s)
    starts = [json.loads(s) for s in client.lrange(f"{keys['starts']}:{run_id}", 0, -1)]
    counts = {int(t): int(c) for t, c in client.hgetall(f"{keys['calls']}:{run_id}").items()}
    victim.start()
    fleet.wait_ready([victim])
    resumed_at = [s["at"] for s in starts if s["at"] > killed]
    return {
        "run_id": run_id, "execution_id": eid,
        "recorded_wait_ms": (killed - waited) * 1000,
        "kill_to_resumed_s": (resumed_at[0] - killed) if resumed_at else None,
        "kill_to_finished_s": done["at"] - killed,
        "body_starts": len(starts),
        "model_calls": sum(counts.values()),
        "calls_per_turn": [counts.get(t, 0) for t in range(cfg.resume_calls)],
        "repeated_model_calls": sum(c - 1 for c in counts.values() if c > 1),
        "output_as_uncrashed": done["output"] == ref["output"],
        "tokens_as_uncrashed": _tokens(store, eid) == ref["tokens"],
    }


def run_resumes(ctx: Any, cfg: Config, fleet: Fleet, workers: list[Proc], steps: Steps,
                client: redis.Redis, keys: dict[str, str], store: Any,
                label: str) -> dict[str, Any]:
    """Every agent kind's reference run and kill-and-resume runs, with their summary."""
    out: dict[str, Any] = {}
    for kind in cfg.agents:
        ref = _reference(cfg, steps, client, keys, store, kind)
        runs = []
        with ctx.progress.task(f"{label} {kind} resumes", cfg.resumes) as bar:
            for _ in range(cfg.resumes):
                runs.append(_one(cfg, fleet, workers, steps, client, keys, store, kind, ref))
                bar.advance()
        resumed = [r["kill_to_resumed_s"] for r in runs if r["kill_to_resumed_s"] is not None]
        finished = [r["kill_to_finished_s"] for r in runs]
        out[kind] = {
            "uncrashed": ref, "runs": runs,
            "kill_to_resumed_s": spread(resumed) | {
                "p99": percentile(resumed, 99, nearest_rank=True)},
            "kill_to_finished_s": spread(finished) | {
                "p99": percentile(finished, 99, nearest_rank=True)},
            "repeated_model_calls": sum(r["repeated_model_calls"] for r in runs),
            "all_as_uncrashed": all(r["output_as_uncrashed"] and r["tokens_as_uncrashed"]
                                    for r in runs),
            "all_made_every_call": all(r["model_calls"] == cfg.resume_calls for r in runs),
        }
    return out
