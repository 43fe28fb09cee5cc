"""Workload "chaos": agent executions on 3 real Celery workers while a fault is injected, one
fault kind per run, at the library's default settings (and, with --tuned, again at the
tuned settings the run used before):

    plan -> research -> draft -> act (non-idempotent, reconcile callback) -> summarize
    steps of 0.2-1 s, so faults land mid-step; research and draft each call
    lai.checkpoint() twice; Redis broker; a real beat process

Fault kinds (faults.py): SIGKILL of a pool child, SIGKILL of a whole worker (restarted at
once, as a supervisor would), SIGSTOP of a whole worker past the lease and worker TTL then
SIGCONT, a store outage and a broker outage (a TCP proxy of ours cut for N seconds). The
side effect of `act` is counted in a Redis hash keyed by its idempotency key, outside our
stores; every checkpoint() call is timed by the body and noted with a marker (records lost,
longest hold). What each run reads back is in record.py; one run is one_run.py.

Deployment under test: 3 step workers (prefork -c 1, queue "steps"); beat and one small
worker for the recovery tick (queue "recovery", -c 1) that the faults spare. Executions are
started through a window (at most `window` in flight), as an agent platform with bounded
concurrency would.

Then the same kind of kills with Celery alone (plain tasks, acks_late, Redis broker with its
default one-hour visibility timeout, no livingai_tasks): how many executions do not finish
by the same kind of deadline.

    python -m loadtest.chaos [--quick] [--faults sigkill-worker,store-outage] [--tuned]
                             [--executions N] [--stores redis,tiered]
"""

from __future__ import annotations

import argparse
import json
import random
import time
import uuid
from collections import Counter
from dataclasses import asdict
from typing import Any

import redis

from ..cli import positive_int
from ..core.context import RunContext
from ..core.machine import library_state, load_average
from ..core.tables import table
from ..fleet.app import Work, fx_keys, make_app, side_effects
from ..fleet.processes import Fleet, Namespace
from .config import BROKERS, Config, config_of
from .faults import FAULT_KINDS, KillInjector, applies, parse_faults
from .one_run import lai_run

NAME = "chaos"
DESCRIPTION = ("agent executions on 3 real workers under faults (SIGKILL of a child or a "
               "worker, SIGSTOP, store and broker outages) at the library's defaults: lost, "
               "duplicate side effects, kill-to-resume, records lost, holds; vs Celery alone")


def _alone_run(ctx: RunContext, cfg: Config, rng: random.Random) -> dict[str, Any]:
    """Celery alone: plain tasks with acks_late on the Redis broker, the same kind of kills."""
    ns = Namespace(uuid.uuid4().hex[:8], ctx.servers.redis_url)
    logs = ctx.results_dir / "chaos-logs" / f"celery-alone-{ns.tag}"
    r = redis.Redis.from_url(ns.redis_url)
    keys = fx_keys(ns.prefix)
    fleet = Fleet(logs, {**ns.env(), "LT_MODE": "plain-tuned", "LT_QUEUE": "steps"},
                  loglevel="INFO")
    try:
        workers = [fleet.worker(f"alone-w{i + 1}-{ns.tag}", ["steps"])
                   for i in range(cfg.workers)]
        fleet.wait_ready()
        _, steps = make_app("plain-tuned", prefix=ns.prefix, redis_url=ns.redis_url,
                            queue="steps")
        work = Work(cpu_rounds=1, sleep_ms=cfg.step_ms, trace=True)
        runs = [f"alone-{i:03d}" for i in range(cfg.alone_executions)]
        for run_id in runs:  # all at once: nothing here would free a window slot of a lost one
            steps.canvas(run_id, work).apply_async()
        chaos = KillInjector(["main", "child", "main", "main"], workers, rng,
                             cfg.kill_every_s, cfg.alone_kills)
        while len(chaos.kills) < cfg.alone_kills and r.hlen(keys["done"]) < len(runs):
            said = chaos.tick()
            if said is not None:
                ctx.log(f"chaos (Celery alone): {said}")
            time.sleep(0.2)
        deadline = time.monotonic() + cfg.alone_drain_s
        while r.hlen(keys["done"]) < len(runs) and time.monotonic() < deadline:
            time.sleep(0.2)
        done = r.hlen(keys["done"])
        unacked = r.hlen(f"{ns.prefix}-celery:unacked")
        failed_lost = _worker_lost_failures(r, ns)
        effects, duplicates = side_effects(r, ns.prefix)
    finally:
        fleet.stop()
        ns.cleanup()
        r.close()
    problems = fleet.log_problems(limit=10)
    return {"executions": len(runs), "completed": done, "not_finished": len(runs) - done,
            "kills": [asdict(k) for k in chaos.kills],
            "deadline": f"{cfg.alone_drain_s:.0f}s after the last kill",
            "unacked_messages_waiting_for_visibility_timeout": unacked,
            "task_results_with_worker_lost_error": failed_lost,
            "side_effects": effects, "duplicate_side_effects": duplicates,
            "worker_log_problems": problems,
            "note": "acks_late: a step killed with its worker stays in the broker's unacked "
                    "hash until the visibility timeout (3600 s) and a restore sweep; a killed "
                    "pool child fails the rest of the chain (WorkerLostError)"}


def _worker_lost_failures(r: redis.Redis, ns: Namespace) -> int:
    found = 0
    for key in r.scan_iter(match=f"{ns.prefix}-celery:celery-task-meta-*", count=1000):
        raw = r.get(key)
        if raw and b"WorkerLostError" in raw:
            found += 1
    return found


def _row(rep: dict[str, Any], target_s: float | None, budget_ms: float) -> dict[str, Any]:
    out = rep["outcomes"]
    res = rep["resumes"]
    fx = rep["side_effects"]
    rec = rep["records"]
    outage = rep.get("outage") or {}
    return {
        "variant": rep["variant"], "fault": rep["fault"], "store": rep["store"],
        "broker": rep["broker"],
        "executions": rep["executions"],
        "completed": out["by_status"].get("COMPLETED", 0), "lost": len(out["lost"]),
        "failed": len(out["failed"]), "in_doubt": len(out["in_doubt"]),
        "dup_distinct_keys": fx["distinct_key_duplicates"],
        "dup_same_key": fx["same_key_repeats"],
        "faults": len(rep["kill_log"]) or (1 if outage else 0),
        "steps_hit": res["steps_in_flight_at_a_kill"],
        "resume_p50_s": res["resume"]["p50_s"], "resume_p99_s": res["resume"]["p99_s"],
        "resume_max_s": res["resume"]["max_s"], "target_s": target_s,
        "records_lost": rec["records_lost"], "checkpoints": rec["checkpoints_made"],
        "hold_max_ms": rec["hold_ms"]["max"], "budget_ms": budget_ms,
        "queued_on_return": rec["engine_counters"].get("checkpoint_budget_overruns"),
        "rss_mib": rep["memory"]["peak_rss_total_mib"],
        "spill_bytes": rep["memory"]["spill_peak_bytes"],
        "drain_s": outage.get("drain_s"),
    }


def _checks(row: dict[str, Any]) -> dict[str, bool]:
    checks = {"lost == 0": row["lost"] == 0,
              "duplicates with distinct keys == 0": row["dup_distinct_keys"] == 0}
    if row["target_s"] is not None:
        checks[f"resume p99 < {row['target_s']:g}s"] = (row["resume_p99_s"] is not None
                                                       and row["resume_p99_s"] < row["target_s"])
    if row["fault"].endswith("-outage"):
        # A server away for less than any timeout of ours must not end an execution.
        checks["every execution completed"] = row["completed"] == row["executions"]
    if row["fault"] == "store-outage":
        checks["records lost == 0"] = row["records_lost"] == 0
        checks[f"longest hold < {row['budget_ms']:g} ms"] = (
            row["hold_max_ms"] is not None and row["hold_max_ms"] < row["budget_ms"])
        checks["drained"] = row["drain_s"] is not None
    return checks


def _plan(cfg: Config) -> tuple[list[tuple[Any, str, str]], dict[str, str]]:
    """(variant, store, fault) of every run, and why a pair of store and fault is skipped."""
    runs, skipped = [], {}
    for variant in cfg.variants:
        for kind in cfg.stores:
            for fault in cfg.faults:
                why = applies(fault, kind)
                if why:
                    skipped[f"{fault} {kind}"] = why
                else:
                    runs.append((variant, kind, fault))
    return runs, skipped


def run(ctx: RunContext) -> dict[str, Any]:
    cfg = config_of(ctx)
    rng = random.Random(cfg.seed)
    load_before = load_average()
    library_before = library_state()
    plan, skipped = _plan(cfg)
    reports = []
    for variant, kind, fault in plan:
        try:
            reports.append(lai_run(ctx, cfg, variant, kind, fault, rng))
        except Exception as exc:  # noqa: BLE001 - reported; the other runs still run
            reason = ctx.failed(f"chaos {variant.name} {fault} {kind}", exc)
            reports.append({"store": kind, "fault": fault, "variant": variant.name,
                            "error": reason})
    alone: dict[str, Any] = {"error": "skipped (--skip-alone)"}
    if not ctx.options.get("skip_alone"):
        try:
            alone = _alone_run(ctx, cfg, rng)
        except Exception as exc:  # noqa: BLE001
            alone = {"error": f"{type(exc).__name__}: {exc}"}
    load_after = load_average()
    variants = {v.name: v for v in cfg.variants}
    rows = [_row(rep, variants[rep["variant"]].target_s(rep["fault"]),
                 variants[rep["variant"]].setting("budget_ms"))
            for rep in reports if "error" not in rep]
    checks = {f"{r['variant']} {r['fault']} {r['store']}": _checks(r) for r in rows}
    text = table(rows, list(rows[0]) if rows else ["store"])
    text += "\n" + _notes(reports, alone, skipped)
    text += f"\nchecks: {json.dumps(checks)}"
    text += f"\nload average before {load_before}, after {load_after} (1/5/15 min, 2 cores)"
    result: dict[str, Any] = {
        "description": DESCRIPTION,
        "params": {**{k: v for k, v in asdict(cfg).items() if k != "variants"},
                   "variants": {v.name: {"settings": v.settings, "env": v.env,
                                         "sigstop_pause_s": v.pause_s, "drain_s": v.drain_s,
                                         "targets_s": {f: v.target_s(f) for f in FAULT_KINDS}}
                                for v in cfg.variants},
                   "broker": cfg.broker,
                   "deployment": f"{cfg.workers} step workers (prefork -c {cfg.concurrency}, "
                                 f"{cfg.broker} "
                                 "broker) + beat"
                   + (" (recovery tick on the step queue)" if cfg.recovery_on_step_queue else
                      " + 1 recovery worker (-c 1, queue 'recovery', spared by the faults)")},
        "rows": {f"chaos {r['variant']} {r['fault']} {r['store']}": {
            "store": r["store"], "ours": r, "livingai": None,
            "livingai_note": "compared with Celery alone"} for r in rows},
        "summary": rows, "checks": checks, "skipped": skipped, "runs": reports,
        "celery_alone": alone,
        "load_average": {"before": load_before, "after": load_after},
        "library": {"before": library_before, "after": library_state()},
        "table": text,
    }
    ctx.write_json(NAME, result)
    return result


def _notes(reports: list[dict[str, Any]], alone: dict[str, Any],
           skipped: dict[str, str]) -> str:
    lines = []
    if "error" not in alone:
        lines.append(
            f"Celery alone (acks_late, Redis broker, default visibility timeout): "
            f"{alone['completed']}/{alone['executions']} finished within {alone['deadline']}, "
            f"{alone['not_finished']} not finished "
            f"({alone['unacked_messages_waiting_for_visibility_timeout']} messages waiting in "
            f"unacked for the visibility timeout, "
            f"{alone['task_results_with_worker_lost_error']} task results failed with "
            f"WorkerLostError: a killed step and the rest of its chain); "
            f"{len(alone['kills'])} kills")
    for pair, why in skipped.items():
        lines.append(f"skipped {pair}: {why}")
    for rep in reports:
        label = f"{rep['variant']} {rep['fault']} {rep['store']}"
        if "error" in rep:
            lines.append(f"{label}: FAILED: {rep['error']}")
            continue
        out = rep["outcomes"]
        for kind, n in Counter(x["kind"] for x in out["lost"]).items():
            lines.append(f"{label}: {n} lost: {kind}")
        for x in out["in_doubt"] + out["failed"]:
            lines.append(f"{label}: {x['execution_id']}: {x['reason']}")
        for problem in rep.get("worker_log_problems", [])[:5]:
            lines.append(f"{label}: worker log: {problem}")
    return "\n".join(lines)


def _faults_arg(text: str) -> tuple[str, ...]:
    try:
        return parse_faults(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seconds_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def add_options(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m loadtest.chaos`, on top of --quick, --out and --stores."""
    parser.add_argument("--faults", type=_faults_arg,
                        help=f"comma-separated fault kinds ({', '.join(FAULT_KINDS)}; "
                             "default: all that apply to the chosen stores)")
    parser.add_argument("--broker", choices=BROKERS,
                        help="the step workers' broker (default redis; rabbitmq: "
                             "LOADTEST_AMQP_URL, default amqp://guest:guest@127.0.0.1:5672//, "
                             "queues named after the run and deleted after it)")
    parser.add_argument("--tuned", action="store_true", default=None,
                        help="also run every fault at the tuned settings (lease 4 s, ticks "
                             "1 s, stuck after 10 s) as extra rows")
    parser.add_argument("--executions", type=int,
                        help="executions per run (default per fault kind; quick 16-30)")
    parser.add_argument("--lease-s", dest="lease_s", type=_seconds_arg,
                        help="the tuned variant's LIVINGAI_LEASE_S (4)")
    parser.add_argument("--store-outage-s", dest="store_outage_s", type=_seconds_arg,
                        help="how long the store is cut off (60, quick 8)")
    parser.add_argument("--broker-outage-s", dest="broker_outage_s", type=_seconds_arg,
                        help="how long the broker is cut off (30, quick 8)")
    parser.add_argument("--deadline-s", dest="deadline_s", type=_seconds_arg,
                        help="the longest one run may take (1200, quick 300)")
    parser.add_argument("--concurrency", type=positive_int,
                        help="pool children per step worker (default 1): 17 gives the "
                             "production tier's ~50 agents on 3 workers")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--recovery-on-step-queue", dest="recovery_on_step_queue",
                        action="store_true", default=None,
                        help="no recovery worker: beat sends the tick to the step queue")
    parser.add_argument("--skip-alone", dest="skip_alone", action="store_true", default=None,
                        help="skip the Celery-alone comparison")
