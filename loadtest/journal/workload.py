"""Workload "journal": what journaled calls cost an agent, and how an agent killed after its
10th model call resumes, on a real fleet (Redis broker, two workers -c 1, beat), per store:

    per-call overhead   overhead.py: each agent kind (the raw `lai.call` core, and a Pydantic
                        AI agent through the adapter) journaled against the same agent plain,
                        alternating, in steps on the workers: added wall and CPU per model
                        call, median and p99, and the spread over the rounds
    resume              resume.py: the agent SIGKILLed with 10 of its 15 model calls
                        recorded; kill to resumed and to finished, p50/p99, and the model
                        calls made again (target 0)

    python -m loadtest.journal [--quick] [--stores redis,postgres,sqlite,tiered]
                               [--agents core,pydantic] [--calls 50] [--rounds 20]
                               [--resumes 5] [--lease-s S] [--recovery-interval-s S] [--out DIR]
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis

import livingai_tasks as lai

from ..core.context import RunContext
from ..core.library import close_runtime
from ..core.machine import describe, library_state, load_average
from ..core.stores import unreachable
from ..core.tables import table
from ..fleet.processes import Fleet, Namespace, migrated_store
from .app import make_app, marks
from .config import Config, config_of
from .overhead import run_overhead
from .resume import run_resumes

__all__ = ["NAME", "DESCRIPTION", "run", "summary_rows", "checks"]

NAME = "journal"
DESCRIPTION = ("journaled calls on a real fleet: added wall and CPU per model call against "
               "the same agent plain (lai.call and Pydantic AI), and an agent killed after "
               "its 10th model call: time to resume, calls repeated")

COLUMNS = ["store", "agent", "wall p50: plain -> journaled (+)", "wall p99", "cpu p50",
           "cpu p99", "+cpu/call all told (rounds)", "cpu x",
           "kill->resumed p50/p99 s", "kill->finished p50/p99 s", "repeated", "load"]


def _pair(agent: dict[str, Any], what: str, q: str) -> str:
    j, p = agent["journaled"][f"call_{what}_ms"][q], agent["plain"][f"call_{what}_ms"][q]
    return f"{p:.3f} -> {j:.3f} (+{j - p:.3f})"


def summary_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One line per store and agent kind."""
    rows = []
    for kind, agent in report.get("overhead", {}).get("agents", {}).items():
        added = agent["added"]
        rounds = added["round_cpu_per_call_ms"]
        resumed = report.get("resume", {}).get(kind)
        row = {"store": report["store"], "agent": kind,
               "wall p50: plain -> journaled (+)": _pair(agent, "wall", "p50"),
               "wall p99": _pair(agent, "wall", "p99"),
               "cpu p50": _pair(agent, "cpu", "p50"), "cpu p99": _pair(agent, "cpu", "p99"),
               "+cpu/call all told (rounds)": f"{rounds['median']:.3f} "
                                              f"({rounds['min']:.3f}..{rounds['max']:.3f})",
               "cpu x": f"{added['cpu_ratio']:.2f}",
               "load": "{} -> {}".format(report["load_start"][0], report["load_end"][0])}
        if resumed:
            r, f = resumed["kill_to_resumed_s"], resumed["kill_to_finished_s"]
            row["kill->resumed p50/p99 s"] = f"{r['median']:.2f}/{r['p99']:.2f}"
            row["kill->finished p50/p99 s"] = f"{f['median']:.2f}/{f['p99']:.2f}"
            row["repeated"] = resumed["repeated_model_calls"]
        rows.append(row)
    return rows


def checks(report: dict[str, Any]) -> dict[str, bool]:
    """The issue's target and the run's own sanity checks, for one store."""
    found: dict[str, bool] = {}
    for kind, r in report.get("resume", {}).items():
        found[f"{kind}: 0 repeated model calls"] = r["repeated_model_calls"] == 0
        found[f"{kind}: every resumed run made every call once"] = r["all_made_every_call"]
        found[f"{kind}: output and tokens as the uncrashed run's"] = r["all_as_uncrashed"]
        found[f"{kind}: every run resumed"] = r["kill_to_resumed_s"]["n"] == len(r["runs"])
    return found


def _store_run(ctx: RunContext, cfg: Config, kind: str) -> dict[str, Any]:
    ns = Namespace(uuid.uuid4().hex[:8], ctx.servers.redis_url)
    logs = ctx.results_dir / "journal-logs" / f"{kind}-{ns.tag}"
    keys = marks(ns.prefix)
    client = redis.Redis.from_url(ns.redis_url)
    out: dict[str, Any] = {"store": kind, "load_start": load_average()}
    try:
        with migrated_store(ctx, ns, kind) as store_url:
            env = {**ns.env(), "LIVINGAI_STORE": store_url, "LT_AGENTS": ",".join(cfg.agents),
                   **cfg.env()}
            fleet = Fleet(logs, env, app="loadtest.journal.app", loglevel="INFO",
                          inherit_livingai=False)
            store = lai.open_store(store_url)
            try:
                workers = [fleet.worker(f"journal-w{i + 1}-{ns.tag}", ["steps", "recovery"])
                           for i in range(cfg.workers)]
                fleet.wait_ready()
                _, steps = make_app(prefix=ns.prefix, redis_url=ns.redis_url, store=store_url,
                                    settings=cfg.settings)
                ctx.log(f"journal {kind}: fleet up; overhead, {cfg.rounds} rounds of "
                        f"{cfg.calls} calls per agent run")
                out["overhead"] = run_overhead(ctx, cfg, steps, client, keys["overhead"],
                                               f"journal {kind}")
                out["load_mid"] = load_average()
                # The recovery tick only now: the overhead runs need none, and it would
                # take CPU from them every interval.
                fleet.beat()
                ctx.log(f"journal {kind}: resume after model call {cfg.kill_after} of "
                        f"{cfg.resume_calls}, {cfg.resumes} runs per agent")
                out["resume"] = run_resumes(ctx, cfg, fleet, workers, steps, client, keys,
                                            store, f"journal {kind}")
                out["log_problems"] = fleet.log_problems()
            finally:
                fleet.stop()
                store.close()
                close_runtime(timeout_s=5.0)
    finally:
        client.close()
        ns.cleanup()
        out["load_end"] = load_average()
    return out


def run(ctx: RunContext) -> dict[str, Any]:
    cfg = config_of(ctx)
    status = ctx.servers.check()
    reports: dict[str, Any] = {}
    skipped: dict[str, str] = {}
    started = time.time()
    ctx.log(f"journal: stores {','.join(cfg.stores)}, agents {','.join(cfg.agents)}, "
            f"settings {cfg.in_force()}")
    for kind in cfg.stores:
        why = unreachable(kind, status)
        if why:
            ctx.log(f"journal {kind}: skipped ({why})")
            skipped[kind] = why
            continue
        try:
            reports[kind] = _store_run(ctx, cfg, kind)
        except Exception as exc:  # noqa: BLE001 - one store's failure must not end the others
            reports[kind] = {"store": kind, "error": ctx.failed(f"journal {kind}", exc)}
    ok = [r for r in reports.values() if "error" not in r]
    rows = [row for r in ok for row in summary_rows(r)]
    verdicts = {r["store"]: checks(r) for r in ok}
    result: dict[str, Any] = {
        "description": DESCRIPTION, "params": cfg.to_dict(), "settings": cfg.in_force(),
        "machine": describe(), "library": library_state(),
        "started": time.strftime("%FT%TZ", time.gmtime(started)),
        "wall_s": time.time() - started, "stores": reports, "skipped": skipped,
        "summary": rows, "checks": verdicts,
    }
    text = table(rows, COLUMNS) if rows else "(no store ran)"
    text += ("\nper model call, ms; '+cpu/call all told': the journaled run's CPU per call "
             "minus the plain run's, writes included (median of the rounds, min..max); "
             "'cpu x': the same as a ratio; load: 1-min load average at start -> end")
    for kind, r in reports.items():
        if "error" in r:
            text += f"\n{kind}: failed: {r['error']}"
    for kind, got in verdicts.items():
        missed = [name for name, passed in got.items() if not passed]
        text += f"\n{kind}: " + ("all checks met" if not missed else "MISSED " + "; ".join(missed))
    result["table"] = text
    ctx.write_json(NAME, result)
    return result
