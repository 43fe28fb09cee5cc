"""One chaos run: a fresh fleet (3 step workers, a recovery worker, beat) on one store, one
settings variant and one fault kind; executions started through a window while the fault
is injected; then the record, the side-effect counters and the workers' own notes read back.

For an outage, the workers (and beat) reach the server through a TCP proxy of ours that the
run cuts; the harness reaches the servers directly, so it can start executions and watch
the store throughout.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Protocol

import redis

import livingai_tasks as lai
from livingai_tasks import ExecutionStatus

from ..core.context import RunContext
from ..core.library import close_runtime
from ..core.servers import Servers, delete_queues
from ..core.stores import isolated
from ..core.tcp_proxy import TcpProxy, target_of
from ..fleet.app import Steps, Work, fx_keys, make_app
from ..fleet.processes import Fleet, Namespace, Proc, children_of, rss_bytes
from .config import Config, Variant
from .faults import KillInjector, Outage, OutageInjector, StopInjector
from .record import RunData, analyse, anomalies, evidence

__all__ = ["lai_run", "queues"]

_TERMINAL = (ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.IN_DOUBT,
             ExecutionStatus.CANCELLED)
# The library's disk buffer setting, if this version of it has one (issue 17).
_SPILL = "spill_dir"


class Injector(Protocol):
    kills: list[Any]

    def tick(self) -> str | None: ...
    def busy(self) -> bool: ...
    def finish(self) -> None: ...


def queues(cfg: Config, ns: Namespace) -> tuple[str, str]:
    """(step queue, recovery queue), named after the run: on RabbitMQ, which other users
    of the machine share, queues are global to the vhost."""
    steps = f"{ns.prefix}-steps"
    return steps, steps if cfg.recovery_on_step_queue else f"{ns.prefix}-recovery"


def broker_url(ctx: RunContext, cfg: Config, ns: Namespace) -> str:
    return ctx.servers.amqp_url if cfg.broker == "rabbitmq" else ns.redis_url


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
        "checkpoints": [json.loads(x) for x in r.lrange(keys["checkpoints"], 0, -1)],
        "metrics": {k: json.loads(v) for k, v in mapping(keys["metrics"]).items()},
    }


@contextmanager
def _proxy(url: str) -> Iterator[TcpProxy]:
    proxy = TcpProxy(*target_of(url)).start()
    try:
        yield proxy
    finally:
        proxy.close()


@contextmanager
def _store(ctx: RunContext, ns: Namespace, kind: str,
           proxied: bool) -> Iterator[tuple[str, str, list[TcpProxy]]]:
    """(the harness's URL, the workers' URL, the proxies between them and the servers) of
    an isolated, migrated store; `proxied`: the workers go through proxies of their own."""
    with ExitStack() as stack:
        site = stack.enter_context(isolated(ctx.servers, kind, ns.store_name(kind),
                                            ctx.results_dir))
        store = lai.open_store(site.url)
        try:
            store.migrate()
        finally:
            store.close()
        proxies: list[TcpProxy] = []
        worker_url = site.url
        if proxied:
            servers = ctx.servers
            redis_url, pg_url = servers.redis_url, servers.postgres_url
            if kind in ("redis", "tiered"):
                proxies.append(stack.enter_context(_proxy(redis_url)))
                redis_url = proxies[-1].route(redis_url)
            if kind in ("postgres", "tiered"):
                proxies.append(stack.enter_context(_proxy(pg_url)))
                pg_url = proxies[-1].route(pg_url)
            worker_url = replace(site, servers=Servers(redis_url=redis_url,
                                                       postgres_url=pg_url)).url
        yield site.url, worker_url, proxies


def _env(ns: Namespace, cfg: Config, variant: Variant, store_url: str,
         broker: str) -> dict[str, str]:
    step_queue, recovery = queues(cfg, ns)
    return {**ns.env(), "LT_MODE": "lai", "LT_QUEUE": step_queue, "LT_RECOVERY_QUEUE": recovery,
            "LIVINGAI_STORE": store_url, "LT_BROKER": broker, **variant.env}


def _injector(fault: str, cfg: Config, variant: Variant, workers: list[Proc],
              rng: random.Random, store_proxies: list[TcpProxy],
              broker_proxy: TcpProxy | None) -> Injector:
    if fault in ("sigkill-child", "sigkill-worker"):
        mode = "child" if fault == "sigkill-child" else "main"
        return KillInjector([mode], workers, rng, cfg.kill_every_s, cfg.kill_limit)
    if fault == "sigstop":
        return StopInjector(workers, rng, pause_s=variant.pause_s, gap_s=cfg.stop_gap_s,
                            limit=cfg.stop_limit)
    if fault == "store-outage":
        return OutageInjector("store", store_proxies, start_after_s=cfg.outage_after_s,
                              outage_s=cfg.store_outage_s)
    assert broker_proxy is not None
    return OutageInjector("broker", [broker_proxy], start_after_s=cfg.outage_after_s,
                          outage_s=cfg.broker_outage_s)


class _Sampler:
    """Peak resident memory of the fleet's processes and peak size of the spill folder,
    sampled about once a second (reading /proc is cheap, not free)."""

    def __init__(self, fleet: Fleet, spill_dir: Path | None) -> None:
        self.fleet = fleet
        self.spill_dir = spill_dir
        self.peak_rss_total = 0
        self.peak_rss_process = 0
        self.peak_spill_bytes = 0
        self._next = 0.0

    def sample(self) -> None:
        if time.monotonic() < self._next:
            return
        self._next = time.monotonic() + 1.0
        total = 0
        for proc in self.fleet.procs:
            if proc.name == "beat" or not proc.alive():
                continue
            for pid in (proc.pid, *children_of(proc.pid)):
                rss = rss_bytes(pid)
                total += rss
                self.peak_rss_process = max(self.peak_rss_process, rss)
        self.peak_rss_total = max(self.peak_rss_total, total)
        if self.spill_dir is not None and self.spill_dir.exists():
            size = sum(p.stat().st_size for p in self.spill_dir.rglob("*") if p.is_file())
            self.peak_spill_bytes = max(self.peak_spill_bytes, size)


def lai_run(ctx: RunContext, cfg: Config, variant: Variant, kind: str, fault: str,
            rng: random.Random) -> dict[str, Any]:
    ns = Namespace(uuid.uuid4().hex[:8], ctx.servers.redis_url)
    logs = ctx.results_dir / "chaos-logs" / f"{variant.name}-{fault}-{kind}-{ns.tag}"
    r = redis.Redis.from_url(ns.redis_url)
    spill_dir = logs / "spill" if _SPILL in variant.settings else None
    try:
        with ExitStack() as stack:
            url, worker_url, store_proxies = stack.enter_context(
                _store(ctx, ns, kind, proxied=fault == "store-outage"))
            broker = broker_url(ctx, cfg, ns)
            step_queue, recovery = queues(cfg, ns)
            if cfg.broker == "rabbitmq":
                stack.callback(delete_queues, broker, sorted({step_queue, recovery}))
            broker_proxy = (stack.enter_context(_proxy(broker))
                            if fault == "broker-outage" else None)
            env = _env(ns, cfg, variant, worker_url,
                       broker_proxy.route(broker) if broker_proxy else broker)
            if spill_dir is not None:
                env["LIVINGAI_SPILL_DIR"] = str(spill_dir)
            fleet = Fleet(logs, env, loglevel="INFO", inherit_livingai=False)
            injector: Injector | None = None
            try:
                workers = [fleet.worker(f"chaos-w{i + 1}-{ns.tag}", [step_queue],
                                        concurrency=cfg.concurrency)
                           for i in range(cfg.workers)]
                if not cfg.recovery_on_step_queue:
                    fleet.worker(f"chaos-recovery-{ns.tag}", [recovery])
                fleet.wait_ready()
                fleet.beat()
                _, steps = make_app("lai", prefix=ns.prefix, redis_url=ns.redis_url,
                                    queue=step_queue, recovery_queue=recovery,
                                    store=url, broker_url=broker)
                executions_n = cfg.executions[fault]
                ctx.log(f"chaos {variant.name} {fault} {kind} ({cfg.broker} broker): "
                         f"{executions_n} executions, "
                         f"window {cfg.window}, {cfg.workers} workers x {cfg.concurrency} "
                         "pool children, lease "
                         f"{variant.setting('lease_s'):g} s, recovery every "
                         f"{variant.setting('recovery_interval_s'):g} s")
                injector = _injector(fault, cfg, variant, workers, rng, store_proxies,
                                     broker_proxy)
                sampler = _Sampler(fleet, spill_dir)
                store = lai.open_store(url)
                try:
                    drive = _drive(ctx, cfg, variant, steps, store, injector, sampler,
                                   executions_n)
                    time.sleep(2.0)  # write-behind of the last idempotent steps
                    executions = {eid: store.get_execution(eid) for eid in drive["run_of"]}
                    versions = {eid: [store.node_versions(n.id) for n in store.nodes(eid)]
                                for eid in drive["run_of"]}
                finally:
                    store.close()
                fetched = _fetch(r, ns)
            finally:
                if injector is not None:
                    injector.finish()  # never leave a worker stopped or a proxy cut
                fleet.stop()
                close_runtime(timeout_s=5.0)
            problems = fleet.log_problems(limit=40)
            recovery_lines = sum(p.text().count("livingai_tasks: resumed") for p in fleet.procs)
    finally:
        ns.cleanup()
        r.close()
    assert injector is not None
    data = RunData(kills=injector.kills, run_of=drive["run_of"], executions=executions,
                   versions=versions, submitted_at=drive["submitted"],
                   first_task=drive["first"], **fetched)
    report = analyse(data)
    odd = anomalies(report)
    outage: Outage | None = getattr(injector, "outage", None)
    report.update(store=kind, fault=fault, variant=variant.name, broker=cfg.broker,
                  drain_expired=drive["drain_expired"], worker_log_problems=problems,
                  recovery_log_lines=recovery_lines, logs=str(logs),
                  kill_log=[asdict(k) for k in injector.kills],
                  outage=_outage_report(outage, drive, data) if outage else None,
                  memory={"peak_rss_total_mib": round(sampler.peak_rss_total / 2**20, 1),
                          "peak_rss_process_mib": round(sampler.peak_rss_process / 2**20, 1),
                          "spill_peak_bytes": sampler.peak_spill_bytes
                          if spill_dir is not None else None,
                          "spill_note": None if spill_dir is not None else
                          "the library has no spill_dir setting: nothing spills to disk"},
                  evidence=evidence(data, odd))
    for eid, ev in report["evidence"].items():  # what the workers said about its 1st step
        ev["log_lines"] = _log_lines(fleet, [ev["first_task_id"], eid])
    return report


def _outage_report(outage: Outage, drive: dict[str, Any], data: RunData) -> dict[str, Any]:
    """Time to drain: from the server's return until every execution in flight at that
    moment reached a final status (its records landed and its chain finished); the first
    step body that began after the return."""
    back = outage.restored_at
    waiting = drive["in_flight_at"].get("restore", [])
    finished = [drive["finished_at"].get(eid) for eid in waiting]
    drained = None if back is None or any(t is None for t in finished) else \
        max([t for t in finished if t is not None], default=back) - back
    first_start = min((float(ev["t"]) for ev in data.starts
                       if back is not None and float(ev["t"]) > back), default=None)
    # Holds while the server was away against the rest: which of the two misses a budget.
    during = [float(c["held_ms"]) for c in data.checkpoints
              if outage.cut_at <= float(c["t"]) <= (back or float("inf"))]
    outside = [float(c["held_ms"]) for c in data.checkpoints
               if not outage.cut_at <= float(c["t"]) <= (back or float("inf"))]
    return {"what": outage.what, "cut_at": outage.cut_at, "restored_at": back,
            "outage_s": round(back - outage.cut_at, 3) if back else None,
            "connections_reset": outage.connections_reset,
            "in_flight_at_cut": len(drive["in_flight_at"].get("cut", [])),
            "in_flight_at_restore": len(waiting),
            "drain_s": round(drained, 3) if drained is not None else None,
            "not_drained": sum(1 for t in finished if t is None),
            "checkpoints_during": len(during),
            "hold_max_ms_during": round(max(during), 3) if during else None,
            "hold_max_ms_outside": round(max(outside), 3) if outside else None,
            "first_step_after_restore_s": round(first_start - back, 3)
            if first_start is not None and back is not None else None}


def _log_lines(fleet: Fleet, needles: list[str | None], limit: int = 12) -> list[str]:
    found: list[str] = []
    for proc in fleet.procs:
        for line in proc.text().splitlines():
            if any(n and n in line for n in needles) and len(found) < limit:
                found.append(f"{proc.log.name}: {line[:300]}")
    return found


def _drive(ctx: RunContext, cfg: Config, variant: Variant, steps: Steps, store: Any,
           injector: Injector, sampler: _Sampler, executions_n: int) -> dict[str, Any]:
    """Start executions through the window, inject the fault meanwhile, wait for the rest."""
    work = Work(cpu_rounds=1, sleep_ms=cfg.step_ms, trace=True, checkpoints=cfg.checkpoints)
    pending = [f"run-{i:04d}" for i in range(executions_n)]
    run_of: dict[str, str] = {}
    submitted: dict[str, float] = {}
    first: dict[str, str] = {}
    finished_at: dict[str, float] = {}
    in_flight_at: dict[str, list[str]] = {}
    in_flight: set[str] = set()
    started = time.monotonic()
    last_start = started
    task = ctx.progress.task(f"chaos {variant.name} {injector_name(injector)}", executions_n)
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
                finished_at[eid] = time.time()
                task.advance()
        sampler.sample()
        if pending or injector.busy():
            said = injector.tick()
            outage: Outage | None = getattr(injector, "outage", None)
            if outage is not None:  # what the cut, then the return, found in flight
                in_flight_at.setdefault("cut", sorted(in_flight))
                if outage.restored_at is not None:
                    in_flight_at.setdefault("restore", sorted(in_flight))
            if said is not None:
                ctx.log(f"chaos: {said}; {len(run_of) - len(in_flight)}/{executions_n} "
                        "finished")
        elif not in_flight or now - last_start > variant.drain_s:
            break
        time.sleep(0.2)
    task.close()
    return {"run_of": run_of, "submitted": submitted, "first": first,
            "finished_at": finished_at, "in_flight_at": in_flight_at,
            "drain_expired": bool(pending or in_flight)}


def injector_name(injector: Injector) -> str:
    return type(injector).__name__.removesuffix("Injector").lower()
