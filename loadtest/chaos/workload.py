"""Workload "chaos": agent executions on 3 real Celery workers while a worker is SIGKILLed
at random every few seconds and restarted at once, as a supervisor would.

    plan -> research -> draft -> act (non-idempotent, reconcile callback) -> summarize
    steps of 0.2-1 s, so kills land mid-step; Redis broker; a real beat process

Kills: mostly the worker's main process (its pool child dies with it: the OOM-killer / lost
node case), sometimes only the pool child (Celery then sees WorkerLostError). The side effect
of `act` is counted in a Redis hash keyed by its idempotency key, outside our stores.

Deployment under test: 3 step workers (prefork -c 1, queue "steps") that get killed; beat and
one small worker for the recovery tick (queue "recovery", -c 1) that do not. The tick has a
queue of its own because beat sends it with expires = one interval: queued behind steps it
would expire unrun (see the README). Executions are started through a window (at most
`window` in flight), as an agent platform with bounded concurrency would, so a step's queue
wait stays well below `stuck_after_s`.

Then the same chaos with Celery alone (plain tasks, acks_late, Redis broker with its default
one-hour visibility timeout, no livingai_tasks): how many executions do not finish by the
same kind of deadline.

    python -m loadtest.chaos [--quick] [--executions N] [--stores redis,tiered]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any

import redis

import livingai_tasks as lai
from livingai_tasks import ExecutionStatus

from ..core.context import RunContext
from ..core.library import close_runtime
from ..core.machine import library_state, load_average
from ..core.tables import table
from ..fleet.app import Steps, Work, fx_keys, make_app, side_effects
from ..fleet.processes import Fleet, Namespace, Proc, children_of, migrated_store
from .record import Kill, RunData, analyse, anomalies, evidence

NAME = "chaos"
DESCRIPTION = ("agent executions on 3 real workers SIGKILLed at random and restarted: lost, "
               "duplicate side effects, IN_DOUBT, kill-to-resume; vs Celery alone")

CHAOS_KINDS = ("redis", "tiered", "postgres", "sqlite")
_TERMINAL = (ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.IN_DOUBT,
             ExecutionStatus.CANCELLED)


@dataclass(frozen=True)
class Config:
    executions: int
    window: int  # executions in flight at once
    workers: int
    kill_every_s: tuple[float, float]
    child_kill_share: float  # the rest are kills of a worker's main process
    step_ms: tuple[float, float]
    lease_s: float
    recovery_interval_s: float
    stuck_after_s: float
    max_attempts: int
    max_recoveries: int
    drain_s: float  # after the last start, how long stragglers get
    deadline_s: float  # the whole lai run, kills included
    stores: tuple[str, ...]
    alone_executions: int  # Celery-alone comparison
    alone_kills: int
    alone_drain_s: float
    seed: int
    # False: the recovery tick has a queue and a worker of its own (recommended). True: beat
    # sends it to the step queue, where the killed step workers pick it up between steps.
    recovery_on_step_queue: bool = False

    @property
    def resume_target_s(self) -> float:
        return 2 * (self.lease_s + self.recovery_interval_s)


def _config(ctx: RunContext) -> Config:
    quick = ctx.quick
    opts = ctx.options
    wanted = ctx.stores or ["redis"]
    stores = tuple(k for k in CHAOS_KINDS if k in wanted) or ("redis",)
    return Config(
        executions=int(opts.get("executions", 16 if quick else 200)),
        window=6 if quick else 9,
        workers=3,
        kill_every_s=(1.5, 3.0) if quick else (3.0, 6.0),
        child_kill_share=0.3,
        step_ms=(100.0, 500.0) if quick else (200.0, 1000.0),
        lease_s=float(opts.get("lease_s", 3.0 if quick else 4.0)),
        recovery_interval_s=1.0,
        stuck_after_s=10.0,
        max_attempts=3,  # the library's defaults
        max_recoveries=10,
        drain_s=30.0 if quick else 90.0,
        deadline_s=float(opts.get("deadline_s", 150 if quick else 1500)),
        stores=stores if not quick else stores[:1],
        alone_executions=8 if quick else 30,
        alone_kills=2 if quick else 3,
        alone_drain_s=6.0 if quick else 45.0,
        seed=int(opts.get("seed", 20240601)),
        recovery_on_step_queue=bool(opts.get("recovery_on_step_queue", False)),
    )


class Chaos:
    """The kill loop: picks a ready step worker, kills it, restarts it at once."""

    def __init__(self, cfg: Config, workers: list[Proc], rng: random.Random) -> None:
        self.cfg = cfg
        self.workers = workers
        self.rng = rng
        self.kills: list[Kill] = []
        self.next_at = time.time() + rng.uniform(*cfg.kill_every_s)

    def tick(self, *, force_mode: str | None = None) -> Kill | None:
        if time.time() < self.next_at:
            return None
        ready = [w for w in self.workers if w.ready() and children_of(w.pid)]
        if not ready:
            return None  # all restarting: try again shortly
        self.next_at = time.time() + self.rng.uniform(*self.cfg.kill_every_s)
        worker = self.rng.choice(ready)
        mode = force_mode or ("child" if self.rng.random() < self.cfg.child_kill_share
                              else "main")
        t = time.time()
        if mode == "main":
            pids = worker.kill_main()
            worker.start()  # the supervisor restarts it at once
        else:
            pids = children_of(worker.pid)[:1]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)  # the worker stays up and forks a new child
        kill = Kill(t, mode, worker.name, pids)
        self.kills.append(kill)
        return kill


def _recovery_queue(cfg: Config) -> str:
    return "steps" if cfg.recovery_on_step_queue else "recovery"


def _env(ns: Namespace, cfg: Config, mode: str) -> dict[str, str]:
    return {**ns.env(), "LT_MODE": mode, "LT_QUEUE": "steps",
            "LT_RECOVERY_QUEUE": _recovery_queue(cfg),
            "LIVINGAI_LEASE_S": str(cfg.lease_s),
            "LIVINGAI_RECOVERY_INTERVAL_S": str(cfg.recovery_interval_s),
            "LIVINGAI_STUCK_AFTER_S": str(cfg.stuck_after_s),
            "LIVINGAI_MAX_ATTEMPTS": str(cfg.max_attempts),
            "LIVINGAI_MAX_RECOVERIES": str(cfg.max_recoveries)}


def _work(cfg: Config) -> Work:
    return Work(cpu_rounds=1, sleep_ms=cfg.step_ms, trace=True)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _fetch(r: redis.Redis, ns: Namespace) -> dict[str, Any]:
    keys = fx_keys(ns.prefix)

    def mapping(key: str) -> dict[str, str]:
        return {_text(k): _text(v) for k, v in r.hgetall(key).items()}

    return {
        "starts": [json.loads(x) for x in r.lrange(keys["starts"], 0, -1)],
        "reconciles": [json.loads(x) for x in r.lrange(keys["reconciles"], 0, -1)],
        "done": {k: float(v) for k, v in mapping(keys["done"]).items()},
        "effects": {k: int(v) for k, v in mapping(keys["effects"]).items()},
        "effect_run": mapping(keys["effect_run"]),
    }


def _lai_run(ctx: RunContext, cfg: Config, kind: str, rng: random.Random) -> dict[str, Any]:
    ns = Namespace(uuid.uuid4().hex[:8], ctx.servers.redis_url)
    logs = ctx.results_dir / "chaos-logs" / f"{kind}-{ns.tag}"
    r = redis.Redis.from_url(ns.redis_url)
    try:
        with migrated_store(ctx, ns, kind) as url:
            fleet = Fleet(logs, {**_env(ns, cfg, "lai"), "LIVINGAI_STORE": url}, loglevel="INFO")
            try:
                workers = [fleet.worker(f"chaos-w{i + 1}-{ns.tag}", ["steps"])
                           for i in range(cfg.workers)]
                if not cfg.recovery_on_step_queue:
                    fleet.worker(f"chaos-recovery-{ns.tag}", ["recovery"])
                fleet.wait_ready()
                fleet.beat()
                _, steps = make_app("lai", prefix=ns.prefix, redis_url=ns.redis_url,
                                    queue="steps", recovery_queue=_recovery_queue(cfg),
                                    store=url)
                ctx.log(f"chaos {kind}: {cfg.executions} executions, window {cfg.window}, "
                         f"{cfg.workers} workers, kill every {cfg.kill_every_s} s, lease "
                         f"{cfg.lease_s} s, recovery every {cfg.recovery_interval_s} s")
                chaos = Chaos(cfg, workers, rng)
                store = lai.open_store(url)
                try:
                    run_of, submitted, first, drain_expired = _drive(ctx, cfg, steps, store, chaos)
                    time.sleep(2.0)  # write-behind of the last idempotent steps
                    executions = {eid: store.get_execution(eid) for eid in run_of}
                    versions = {eid: [store.node_versions(n.id) for n in store.nodes(eid)]
                                for eid in run_of}
                finally:
                    store.close()
                fetched = _fetch(r, ns)
            finally:
                fleet.stop()
                close_runtime(timeout_s=5.0)
            problems = fleet.log_problems(limit=40)
            recovery_lines = sum(p.text().count("livingai_tasks: resumed") for p in fleet.procs)
    finally:
        ns.cleanup()
        r.close()
    data = RunData(kills=chaos.kills, run_of=run_of, executions=executions, versions=versions,
                   submitted_at=submitted, first_task=first, **fetched)
    report = analyse(data)
    odd = anomalies(report)
    report.update(store=kind, drain_expired=drain_expired, worker_log_problems=problems,
                  recovery_log_lines=recovery_lines, logs=str(logs),
                  kill_log=[asdict(k) for k in chaos.kills],
                  evidence=evidence(data, odd))
    for eid, ev in report["evidence"].items():  # what the workers said about its 1st step
        ev["log_lines"] = _log_lines(fleet, [ev["first_task_id"], eid])
    return report


def _log_lines(fleet: Fleet, needles: list[str | None], limit: int = 12) -> list[str]:
    found: list[str] = []
    for proc in fleet.procs:
        for line in proc.text().splitlines():
            if any(n and n in line for n in needles) and len(found) < limit:
                found.append(f"{proc.log.name}: {line[:300]}")
    return found


def _drive(ctx: RunContext, cfg: Config, steps: Steps, store: Any,
           chaos: Chaos) -> tuple[dict[str, str], dict[str, float], dict[str, str], bool]:
    """Start executions through the window, kill workers meanwhile, wait for the rest."""
    work = _work(cfg)
    pending = [f"run-{i:04d}" for i in range(cfg.executions)]
    run_of: dict[str, str] = {}
    submitted: dict[str, float] = {}
    first: dict[str, str] = {}
    in_flight: set[str] = set()
    started = time.monotonic()
    last_start = started
    task = ctx.progress.task("chaos", cfg.executions)
    while True:
        now = time.monotonic()
        if now - started > cfg.deadline_s:
            ctx.log(f"chaos: deadline of {cfg.deadline_s:.0f}s reached")
            break
        while pending and len(in_flight) < cfg.window:
            run_id = pending.pop(0)
            canvas = steps.canvas(run_id, work)
            canvas.freeze()  # task ids known now: the first one is looked up in worker logs
            eid = lai.start(canvas).execution_id
            run_of[eid], submitted[eid], first[eid] = run_id, time.time(), canvas.tasks[0].id
            in_flight.add(eid)
            last_start = time.monotonic()
        for eid in list(in_flight):
            ex = store.get_execution(eid)
            if ex is not None and ex.status in _TERMINAL:
                in_flight.discard(eid)
                task.advance()
        if pending:
            kill = chaos.tick()
            if kill is not None:
                ctx.log(f"chaos: SIGKILL {kill.mode} of {kill.worker} (pids {kill.pids}); "
                         f"{len(run_of) - len(in_flight)}/{cfg.executions} finished")
        elif not in_flight or now - last_start > cfg.drain_s:
            break
        time.sleep(0.2)
    task.close()
    return run_of, submitted, first, bool(pending or in_flight)


def _alone_run(ctx: RunContext, cfg: Config, rng: random.Random) -> dict[str, Any]:
    """Celery alone: plain tasks with acks_late on the Redis broker, the same kind of kills."""
    ns = Namespace(uuid.uuid4().hex[:8], ctx.servers.redis_url)
    logs = ctx.results_dir / "chaos-logs" / f"celery-alone-{ns.tag}"
    r = redis.Redis.from_url(ns.redis_url)
    keys = fx_keys(ns.prefix)
    fleet = Fleet(logs, _env(ns, cfg, "plain-tuned"), loglevel="INFO")
    try:
        workers = [fleet.worker(f"alone-w{i + 1}-{ns.tag}", ["steps"])
                   for i in range(cfg.workers)]
        fleet.wait_ready()
        _, steps = make_app("plain-tuned", prefix=ns.prefix, redis_url=ns.redis_url,
                            queue="steps")
        work = _work(cfg)
        runs = [f"alone-{i:03d}" for i in range(cfg.alone_executions)]
        for run_id in runs:  # all at once: nothing here would free a window slot of a lost one
            steps.canvas(run_id, work).apply_async()
        chaos = Chaos(cfg, workers, rng)
        modes = ["main", "child", "main", "main"][:cfg.alone_kills]
        while len(chaos.kills) < len(modes) and r.hlen(keys["done"]) < len(runs):
            kill = chaos.tick(force_mode=modes[len(chaos.kills)])
            if kill is not None:
                ctx.log(f"chaos (Celery alone): SIGKILL {kill.mode} of {kill.worker}")
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


def _row(rep: dict[str, Any], cfg: Config) -> dict[str, Any]:
    out = rep["outcomes"]
    res = rep["resumes"]
    return {
        "store": rep["store"], "executions": rep["executions"],
        "completed": out["by_status"].get("COMPLETED", 0), "lost": len(out["lost"]),
        "failed": len(out["failed"]), "in_doubt": len(out["in_doubt"]),
        "duplicates": rep["side_effects"]["duplicates"]
        + len(rep["side_effects"]["runs_charged_more_than_once"]),
        "kills": res["kills"], "steps_hit": res["steps_in_flight_at_a_kill"],
        "reconciled": rep["tool"]["reconciled_done"],
        "resume_p50_s": res["resume"]["p50_s"], "resume_p99_s": res["resume"]["p99_s"],
        "p99_once_s": res["resume_rerun_not_killed"]["p99_s"],
        "replays": res["resume_via_continuation_replay"]["n"],
        "all_p99_s": res["resume_all"]["p99_s"], "target_s": cfg.resume_target_s,
    }


def run(ctx: RunContext) -> dict[str, Any]:
    cfg = _config(ctx)
    rng = random.Random(cfg.seed)
    load_before = load_average()
    library_before = library_state()
    reports = []
    for kind in cfg.stores:
        try:
            reports.append(_lai_run(ctx, cfg, kind, rng))
        except Exception as exc:  # noqa: BLE001 - reported; the comparison still runs
            ctx.log(f"!! chaos {kind} failed: {type(exc).__name__}: {exc}")
            reports.append({"store": kind, "error": f"{type(exc).__name__}: {exc}"})
    alone: dict[str, Any] = {"error": "skipped (--skip-alone)"}
    if not ctx.options.get("skip_alone"):
        try:
            alone = _alone_run(ctx, cfg, rng)
        except Exception as exc:  # noqa: BLE001
            alone = {"error": f"{type(exc).__name__}: {exc}"}
    load_after = load_average()
    rows = [_row(rep, cfg) for rep in reports if "error" not in rep]
    checks = {}
    for row in rows:
        checks[row["store"]] = {
            "lost == 0": row["lost"] == 0, "duplicates == 0": row["duplicates"] == 0,
            f"resume p99 < {cfg.resume_target_s:g}s": (row["resume_p99_s"] is not None
                                                       and row["resume_p99_s"]
                                                       < cfg.resume_target_s)}
    text = table(rows, list(rows[0]) if rows else ["store"])
    if "error" not in alone:
        text += (f"\n\nCelery alone (acks_late, Redis broker, default visibility timeout): "
                 f"{alone['completed']}/{alone['executions']} finished within "
                 f"{alone['deadline']}, {alone['not_finished']} not finished "
                 f"({alone['unacked_messages_waiting_for_visibility_timeout']} messages waiting "
                 f"in unacked for the visibility timeout, "
                 f"{alone['task_results_with_worker_lost_error']} task results failed with "
                 f"WorkerLostError: a killed step and the rest of its chain); "
                 f"{len(alone['kills'])} kills")
    for rep in reports:
        if "error" in rep:
            text += f"\n{rep['store']}: FAILED: {rep['error']}"
            continue
        out = rep["outcomes"]
        kinds = Counter(x["kind"] for x in out["lost"])
        for kind, n in kinds.items():
            text += f"\n{rep['store']}: {n} lost: {kind}"
        for x in out["in_doubt"] + out["failed"]:
            text += f"\n{rep['store']}: {x['execution_id']}: {x['reason']}"
    text += f"\nchecks: {json.dumps(checks)}"
    text += f"\nload average before {load_before}, after {load_after} (1/5/15 min, 2 cores)"
    for rep in reports:
        if rep.get("worker_log_problems"):
            text += f"\n{rep.get('store')}: worker log problems:\n  " + \
                "\n  ".join(rep["worker_log_problems"][:10])
    result: dict[str, Any] = {
        "description": DESCRIPTION,
        "params": {**asdict(cfg), "resume_target_s": cfg.resume_target_s, "broker": "redis",
                   "deployment": f"{cfg.workers} step workers (prefork -c 1, killed) + beat"
                   + (" (recovery tick on the step queue)" if cfg.recovery_on_step_queue else
                      " + 1 recovery worker (-c 1, queue 'recovery', not killed)")},
        "rows": {f"chaos {r['store']}": {"store": r["store"], "ours": r, "livingai": None,
                                         "livingai_note": "compared with Celery alone"}
                 for r in rows},
        "summary": rows, "checks": checks, "runs": reports, "celery_alone": alone,
        "load_average": {"before": load_before, "after": load_after},
        "library": {"before": library_before, "after": library_state()},
        "table": text,
    }
    ctx.write_json(NAME, result)
    return result


def add_options(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m loadtest.chaos`, on top of --quick, --out and --stores."""
    parser.add_argument("--executions", type=int, help="executions (default 200, quick 12)")
    parser.add_argument("--lease-s", dest="lease_s", type=float, help="LIVINGAI_LEASE_S (4)")
    parser.add_argument("--deadline-s", dest="deadline_s", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--recovery-on-step-queue", dest="recovery_on_step_queue",
                        action="store_true", default=None,
                        help="no recovery worker: beat sends the tick to the step queue")
    parser.add_argument("--skip-alone", dest="skip_alone", action="store_true", default=None,
                        help="skip the Celery-alone comparison")

