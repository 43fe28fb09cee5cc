"""One store's run of the waits benchmark, on a real fleet: two step workers (prefork), a
recovery worker and beat, Redis broker, everything under one run's key prefix.

    empty store     footprint; fresh executions timed; recovery ticks timed
    N start         lai.start from `start_threads` threads; each hold step reaches
                    lai.wait_for("go") and suspends; the store is asked how many are WAITING
    N waiting       worker slots in use (inspect active/reserved); fresh executions timed on
                    the same slots; footprint; recovery ticks timed
    samples         lai.send to `latency_samples` of them one at a time: from send's return
                    to the woken body starting (and to wait_for returning)
    the rest        lai.send to all others from `start_threads` threads; time to drain
    all completed   recovery ticks timed again; every execution resumed exactly once
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import redis

import livingai_tasks as lai

from ..core.context import RunContext
from ..core.footprint import footprint, redis_footprint
from ..core.library import close_runtime
from ..core.machine import load_average
from ..core.stats import percentile, spread
from ..fleet.processes import Fleet, Namespace, migrated_store, wait_for
from .app import EVENT, Steps, make_app, marks
from .config import Config
from .measure import slots_in_use, tick_series, vacuum

__all__ = ["run_store", "per_execution"]


def _fresh_probe(steps: Steps, client: redis.Redis, key: str, count: int) -> dict[str, Any]:
    """Start `count` fresh executions one by one: from the start call to the body running."""
    asked: dict[str, float] = {}
    for _ in range(count):
        run_id = uuid.uuid4().hex[:12]
        asked[run_id] = time.time()
        lai.start(steps.fresh.s(run_id))
        time.sleep(0.02)
    wait_for(lambda: client.hlen(key) >= len(asked) and all(
        client.hexists(key, r) for r in asked), 60, "the fresh executions to run")
    ran = {(k.decode() if isinstance(k, bytes) else k): float(v)
           for k, v in client.hgetall(key).items()}
    client.delete(key)
    return spread([(ran[r] - t) * 1000 for r, t in asked.items()])


def _count_waiting(store: Any, n: int) -> int:
    return len(store.list_executions(status=lai.ExecutionStatus.WAITING, limit=n + 100))


def _create(ctx: RunContext, cfg: Config, steps: Steps, client: redis.Redis, store: Any,
            keys: dict[str, str]) -> tuple[list[str], dict[str, Any]]:
    """Start every execution through lai.start, in parallel; wait until all are WAITING."""
    n = cfg.executions
    t0 = time.time()
    with ctx.progress.task("start", n) as bar, ThreadPoolExecutor(cfg.start_threads) as pool:
        def one(i: int) -> str:
            eid = lai.start(steps.hold.s(f"w{i}")).execution_id
            bar.advance()
            return eid
        ids = list(pool.map(one, range(n)))
    published = time.time()
    deadline = t0 + cfg.create_timeout_s
    with ctx.progress.task("reach wait_for", n) as bar:
        seen = 0
        while seen < n and time.time() < deadline:
            now_seen = int(client.scard(keys["reached"]))
            bar.advance(now_seen - seen)
            seen = now_seen
            time.sleep(0.5)
    reached = time.time()
    waiting = _count_waiting(store, n)
    while waiting < n and time.time() < deadline:
        time.sleep(1.0)
        waiting = _count_waiting(store, n)
    if waiting < n:
        raise TimeoutError(f"only {waiting}/{n} executions were WAITING after "
                           f"{cfg.create_timeout_s:.0f}s")
    done = time.time()
    return ids, {"publish_s": published - t0, "all_waiting_s": done - t0,
                 "reached_s": reached - t0, "per_s": n / (done - t0), "waiting": waiting}


def _latency(cfg: Config, ids: list[str], client: redis.Redis,
             keys: dict[str, str]) -> dict[str, Any]:
    """lai.send to the first `latency_samples` executions, one at a time."""
    sent: dict[str, float] = {}
    send_ms: list[float] = []
    for i, eid in enumerate(ids[:cfg.latency_samples]):
        t0 = time.time()
        lai.send(eid, EVENT, {"i": i}, key=f"sample-{i}")
        sent[eid] = time.time()
        send_ms.append((sent[eid] - t0) * 1000)
        time.sleep(cfg.send_gap_s)
    wait_for(lambda: all(client.hexists(keys["resumed"], e) for e in sent), 120,
             "the sampled executions to resume")
    marks_ = {e: json.loads(client.hget(keys["resumed"], e) or b"{}") for e in sent}
    to_start = [(marks_[e]["start"] - t) * 1000 for e, t in sent.items()]
    to_return = [(marks_[e]["returned"] - t) * 1000 for e, t in sent.items()]

    def pcts(values: list[float]) -> dict[str, Any]:
        return {"p50": percentile(values, 50), "p99": percentile(values, 99),
                "max": max(values), "min": min(values), "n": len(values)}
    return {"to_body_start_ms": pcts(to_start), "to_wait_return_ms": pcts(to_return),
            "send_call_ms": pcts(send_ms)}


def _timers(cfg: Config, steps: Steps, client: redis.Redis,
            keys: dict[str, str], interval_s: float) -> dict[str, Any]:
    """`timers` waits with a `timer_s` timeout, started spread over one recovery interval so
    their deadlines fall at every phase of the tick: from each deadline to the timed-out
    run's body starting (the recovery tick's path)."""
    for i in range(cfg.timers):
        lai.start(steps.timer.s(f"t{i}", cfg.timer_s))
        time.sleep(interval_s / cfg.timers)
    wait_for(lambda: client.hlen(keys["timer_woken"]) >= cfg.timers,
             cfg.timer_s + 10 * interval_s + 30, "the timers to be woken")
    due = {k: float(v) for k, v in client.hgetall(keys["timer_due"]).items()}
    woken = {k: float(v) for k, v in client.hgetall(keys["timer_woken"]).items()}
    late = [(woken[k] - due[k]) * 1000 for k in woken]
    return {"n": len(late), "timeout_s": cfg.timer_s, "recovery_interval_s": interval_s,
            "late_ms": {"p50": percentile(late, 50), "p99": percentile(late, 99),
                        "min": min(late), "max": max(late)}}


def _drain(ctx: RunContext, cfg: Config, ids: list[str], client: redis.Redis,
           keys: dict[str, str]) -> dict[str, Any]:
    """lai.send to every other execution in parallel; wait until all have resumed."""
    rest = ids[cfg.latency_samples:]
    t0 = time.time()
    with ThreadPoolExecutor(cfg.start_threads) as pool:
        list(pool.map(lambda eid: lai.send(eid, EVENT, {"rest": True}, key="rest"), rest))
    sent = time.time()
    n = len(ids)
    with ctx.progress.task("resume", n) as bar:
        seen = 0
        while seen < n and time.time() - t0 < cfg.drain_timeout_s:
            now_seen = int(client.hlen(keys["resumed"]))
            bar.advance(now_seen - seen)
            seen = now_seen
            time.sleep(0.5)
    done = time.time()
    counts = [int(v) for v in client.hvals(keys["resumes"])]
    return {"sends": len(rest), "send_s": sent - t0,
            "sends_per_s": len(rest) / max(sent - t0, 1e-9), "resumed": seen,
            "drain_s": done - t0, "resumed_twice": sum(c > 1 for c in counts)}


def _vacuumed_ticks(app: Any, cfg: Config, kind: str, into: dict[str, Any],
                    postgres_url: str, name: str) -> None:
    """PostgreSQL: the ticks again after VACUUM ANALYZE, so a slower tick can be told apart
    as dead row versions (every RUNNING -> WAITING -> RUNNING update leaves one in the lease
    index until autovacuum) or live waiting rows."""
    if kind in ("postgres", "tiered"):
        into["vacuum_s"] = vacuum(postgres_url, name.replace("-", "_"))
        into["tick_after_vacuum"] = tick_series(app, cfg.ticks)


def run_store(ctx: RunContext, cfg: Config, kind: str) -> dict[str, Any]:
    """The whole sequence above on one store kind; the figures."""
    ns = Namespace(uuid.uuid4().hex[:8], ctx.servers.redis_url)
    logs = ctx.results_dir / "waits-logs" / f"{kind}-{ns.tag}"
    keys = marks(ns.prefix)
    client = redis.Redis.from_url(ns.redis_url)
    out: dict[str, Any] = {"store": kind, "load_start": load_average()}
    name = ns.store_name(kind)
    where = {"redis_url": ctx.servers.redis_url, "postgres_url": ctx.servers.postgres_url,
             "name": name}
    try:
        with migrated_store(ctx, ns, kind) as store_url:
            env = {**ns.env(), "LIVINGAI_STORE": store_url,
                   "LT_WAIT_TIMEOUT_S": str(cfg.timeout_s)}
            fleet = Fleet(logs, env, app="loadtest.waits.app", loglevel="INFO",
                          inherit_livingai=False)
            store = lai.open_store(store_url)
            try:
                for i in range(cfg.workers):
                    fleet.worker(f"waits-w{i + 1}-{ns.tag}", ["steps"],
                                 concurrency=cfg.concurrency)
                fleet.worker(f"waits-recovery-{ns.tag}", ["recovery"])
                fleet.wait_ready()
                fleet.beat()
                app, steps = make_app(prefix=ns.prefix, redis_url=ns.redis_url, store=store_url,
                                      timeout_s=cfg.timeout_s or None)
                ctx.log(f"waits {kind}: fleet up; the empty store")
                # Footprints are taken after the first fresh probe and before the second,
                # so both hold the same fresh executions and the difference is the waits.
                out["empty"] = {"fresh_ms": _fresh_probe(steps, client, keys["fresh"],
                                                         cfg.fresh)}
                out["empty"]["footprint"] = footprint(kind, store_url=store_url, **where)
                out["empty"]["tick"] = tick_series(app, cfg.ticks)
                ctx.log(f"waits {kind}: starting {cfg.executions} waiting executions")
                ids, out["create"] = _create(ctx, cfg, steps, client, store, keys)
                ctx.log(f"waits {kind}: {cfg.executions} waiting; slots, footprint, ticks")
                out["waiting"] = {
                    "footprint": footprint(kind, store_url=store_url, **where),
                    "slots": slots_in_use(app),
                    "fresh_ms": _fresh_probe(steps, client, keys["fresh"], cfg.fresh),
                    "broker": redis_footprint(ns.redis_url, f"{ns.prefix}-celery:*"),
                    "nodes_per_execution": len(store.nodes(ids[-1])),
                    "resumed_before_any_send": int(client.hlen(keys["resumed"])),
                    "tick": tick_series(app, cfg.ticks)}
                out["waiting"]["slots_after_ticks"] = slots_in_use(app)
                _vacuumed_ticks(app, cfg, kind, out["waiting"], ctx.servers.postgres_url, name)
                ctx.log(f"waits {kind}: event-to-resume latency, {cfg.latency_samples} sends")
                out["latency"] = _latency(cfg, ids, client, keys)
                ctx.log(f"waits {kind}: {cfg.timers} timeouts woken by the recovery tick")
                out["timers"] = _timers(cfg, steps, client, keys,
                                        lai.Settings().recovery_interval_s)
                out["drain"] = _drain(ctx, cfg, ids, client, keys)
                out["completed"] = {
                    "waiting_left": _count_waiting(store, cfg.executions),
                    "footprint": footprint(kind, store_url=store_url, **where),
                    "tick": tick_series(app, cfg.ticks)}
                _vacuumed_ticks(app, cfg, kind, out["completed"], ctx.servers.postgres_url,
                                name)
                out["log_problems"] = fleet.log_problems()
            finally:
                fleet.stop()
                store.close()
                close_runtime(timeout_s=5.0)
    finally:
        ns.cleanup()
        out["load_end"] = load_average()
    out["per_execution"] = per_execution(out, cfg.executions)
    return out


def per_execution(out: dict[str, Any], n: int) -> dict[str, Any]:
    """(waiting footprint - empty footprint) / n, per server: bytes, and keys or rows."""
    empty, full = out["empty"]["footprint"], out["waiting"]["footprint"]
    per: dict[str, Any] = {}
    for server, now in full.items():
        before = empty.get(server, {})
        per[server] = {"bytes": (now["bytes"] - before.get("bytes", 0)) / n}
        for unit in ("keys", "rows"):
            if unit in now:
                per[server][unit] = (now[unit] - before.get(unit, 0)) / n
        if "tables" in now:
            per[server]["tables"] = {
                t: {"rows": (v["rows"] - before.get("tables", {}).get(t, {}).get("rows", 0)) / n,
                    "bytes": (v["bytes"] - before.get("tables", {}).get(t, {}).get("bytes", 0)) / n}
                for t, v in now["tables"].items()}
    return per
