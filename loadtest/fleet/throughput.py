"""Workload "fleet": throughput of 5-step agent chains on a real Celery fleet, with and
without livingai_tasks, on one Redis broker, in one run.

The same five step bodies (loadtest/fleet/app.py) run as
  plain        plain Celery tasks, Celery's defaults (early ack)      -> the baseline
  plain-tuned  plain Celery tasks with acks_late and the Celery settings install() applies
               (prefetch 1): splits the overhead into "Celery settings" and "our recording"
  lai          install() + 4 @agent_step + 1 non-idempotent @tool_step, on the store under test
and, with `--one-write`,
  one-write    plain-tuned + one write per step after it ran (its input and output, one round
               trip): one autocommitted statement while the postgres store runs, a pipelined
               Redis write for the other stores; the cost of "about one write" a step,
               measured beside livingai's instead of assumed
Each variant has its own 2 worker processes (prefork, -c 1 each) on its own queue; Redis is
the broker and the result backend for all (results stored, the same for all). A batch
publishes N chains at once; its wall time runs from the first publish to the moment the last
chain's final step finished (the step writes its time into Redis). Batches alternate between
variants for several rounds (the order rotates each round) and the medians are reported:
this machine has 2 cores shared with other jobs, so single batches are noisy. `--events`
turns task events on in every variant, as on a fleet that Flower watches.

Per-step overhead = (wall_lai - wall_plain) / steps * worker processes: the time each step
costs a worker on top of plain Celery. CPU per step = the whole machine's busy CPU time over
the batch (/proc/stat: workers, Redis, the publisher) / steps; when the batch is CPU-bound
its steps/s is the machine's cores over this, so the ratio follows it. Each part's own CPU
per step (cost.py: the variant's pool children and worker main processes, Redis,
PostgreSQL, the publisher, from /proc) says where it goes; "added cpu" is livingai's
workers + servers over the tuned variant's. A livingai store's growth over the batch, per
step, is its bytes per step. A livingai batch counts only if the store afterwards holds
every step of every chain as SUCCESS and every execution COMPLETED.

    python -m loadtest.fleet [--quick] [--chains N] [--rounds R] [--stores redis,postgres]
                             [--works noop,cpu,llm5,llm20,llm200] [--events] [--one-write]
"""

from __future__ import annotations

import argparse
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis

import livingai_tasks as lai
from livingai_tasks import ExecutionStatus, Status

from ..core.context import RunContext
from ..core.library import close_runtime
from ..core.machine import library_state, load_average, machine_busy_s
from ..core.servers import delete_keys, execute_sql, psycopg_url
from ..core.stats import median
from ..core.tables import table
from .app import STEP_NAMES, Steps, Work, fx_keys, make_app, one_write_tables, side_effects
from .cost import PARTS, WORKER_PARTS, batch_clock, store_bytes
from .processes import Fleet, Namespace, migrated_store

NAME = "fleet"
DESCRIPTION = ("5-step agent chains on 2 real Celery worker processes (Redis broker): steps/s "
               "of plain Celery vs livingai_tasks, ratio, per-step overhead")

# The order stores run in: Redis (the target's store) first, while the machine is freshest.
STORE_ORDER = ("redis", "postgres", "sqlite", "tiered")
WORKERS = 2  # worker processes per variant, prefork pool, concurrency 1 each
STEPS = len(STEP_NAMES)
VARIANTS = ("plain", "plain-tuned", "lai")
ONE_WRITE = "one-write"  # the optional fourth variant (--one-write)
WORKS = {
    # No work at all: the step only carries its ~20 KB state on. What recording costs is as
    # visible as it gets (the per-step cost issue's "no-op step").
    "noop": Work(cpu_rounds=0),
    "cpu": Work(sleep_ms=(0.0, 0.0)),  # a few ms of CPU per step, nothing else
    "llm5": Work(sleep_ms=(5.0, 5.0)),  # + 5 ms of simulated model latency per step
    "llm20": Work(sleep_ms=(20.0, 20.0)),  # + 20 ms of simulated model latency per step
    "llm200": Work(sleep_ms=(200.0, 200.0)),  # a fast real model call; not in the default run
}
# Targets of the per-step cost issue, per (store, work): the ratio of steps/s to plain
# Celery, and the CPU a no-op step adds (workers + servers, against the tuned variant).
RATIO_TARGETS = {("redis", "noop"): 0.8, ("postgres", "noop"): 0.7,
                 ("redis", "llm20"): 0.95, ("postgres", "llm20"): 0.95,
                 ("tiered", "llm20"): 0.9, ("sqlite", "llm20"): 0.9}
ADDED_CPU_TARGETS_MS = {"redis": 0.5, "postgres": 1.0, "tiered": 1.0, "sqlite": 1.0}


@dataclass(frozen=True)
class Config:
    chains: int
    rounds: int
    stores: tuple[str, ...]
    works: tuple[str, ...]
    events: bool = False  # task events on in every variant (a fleet Flower watches)
    one_write: bool = False  # the one-write variant too
    warmup: int = 6
    batch_timeout_s: float = 300.0
    deadline_s: float = 3600.0  # the whole workload; later batches are skipped after it

    @property
    def variants(self) -> tuple[str, ...]:
        return (*VARIANTS[:2], ONE_WRITE, VARIANTS[2]) if self.one_write else VARIANTS


def _config(ctx: RunContext) -> Config:
    quick = ctx.quick
    opts = ctx.options
    wanted = ctx.stores or (["redis"] if quick else ["redis", "postgres", "sqlite"])
    stores = [k for k in STORE_ORDER if k in wanted]
    works = tuple(opts.get("works", "cpu" if quick else "cpu,llm20").split(","))
    return Config(chains=int(opts.get("chains", 30 if quick else 300)),
                  rounds=int(opts.get("rounds", 1 if quick else 3)),
                  stores=tuple(stores), works=works, events=bool(opts.get("events")),
                  one_write=bool(opts.get("one_write")),
                  warmup=2 if quick else 6,
                  batch_timeout_s=float(opts.get("batch_timeout_s", 120 if quick else 300)),
                  deadline_s=float(opts.get("deadline_s", 240 if quick else 3600)))


@dataclass
class Batch:
    store: str
    work: str
    variant: str
    round: int
    chains: int
    wall_s: float | None = None
    steps_per_s: float | None = None
    publish_s: float = 0.0
    cpu_ms_per_step: float | None = None  # the whole machine's busy CPU time / steps
    # Each part's own CPU time per step (cost.PARTS: pool, main, redis, postgres, publisher)
    cpu_parts_ms: dict[str, float] = field(default_factory=dict)
    store_bytes_per_step: float | None = None  # lai only: how much the store grew
    finished_chains: int = 0
    side_effects: int = 0
    duplicate_side_effects: int = 0
    recorded_nodes: int | None = None  # lai only: SUCCESS nodes found in the store
    completed_executions: int | None = None  # lai only
    error: str | None = None


@dataclass
class Bench:
    """Everything one fleet run holds: names, the Redis client, apps, worker fleets."""

    ctx: RunContext
    cfg: Config
    ns: Namespace
    logs: Path
    r: redis.Redis = field(init=False)
    batches: list[Batch] = field(default_factory=list)
    fleets: dict[str, Fleet] = field(default_factory=dict)  # by variant
    # where the one-write variant writes while this store runs: (psycopg URL, schema), or
    # None for Redis
    one_write_pg: tuple[str, str] | None = None
    problems: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.r = redis.Redis.from_url(self.ns.redis_url)

    def fleet(self, mode: str, queue: str, store_url: str | None = None,
              extra_env: dict[str, str] | None = None) -> Fleet:
        env = {**self.ns.env(), "LT_MODE": mode, "LT_QUEUE": queue,
               "LT_EVENTS": "1" if self.cfg.events else "0", **(extra_env or {})}
        if store_url:
            env["LIVINGAI_STORE"] = store_url
        fleet = Fleet(self.logs / queue, env)
        for i in range(WORKERS):
            fleet.worker(f"{queue}-w{i + 1}-{self.ns.tag}", [queue])
        fleet.wait_ready()
        self.fleets[mode] = fleet
        return fleet

    def out_of_time(self) -> bool:
        return time.monotonic() - self.started > self.cfg.deadline_s

    def run_batch(self, batch: Batch, steps: Steps, work: Work, store_url: str | None) -> None:
        keys = fx_keys(self.ns.prefix)
        self.r.delete(keys["done"], keys["effects"], keys["effect_run"])
        run_ids = [f"{batch.variant}-{uuid.uuid4().hex[:12]}" for _ in range(batch.chains)]
        execution_ids: list[str] = []
        kind = batch.store if store_url is not None and batch.round > 0 else None
        bytes0 = store_bytes(self.ctx.servers, self.ns, kind, store_url) if kind and store_url \
            else 0
        clock = batch_clock(self.fleets[batch.variant])
        clock.start()
        busy0 = machine_busy_s()
        t0 = time.time()
        for run_id in run_ids:
            canvas = steps.canvas(run_id, work)
            if batch.variant == "lai":
                execution_ids.append(lai.start(canvas).execution_id)
            else:
                canvas.apply_async()
        batch.publish_s = time.time() - t0
        deadline = time.monotonic() + self.cfg.batch_timeout_s
        while self.r.hlen(keys["done"]) < batch.chains and time.monotonic() < deadline:
            time.sleep(0.05)
        done = [float(v) for v in self.r.hvals(keys["done"])]
        batch.finished_chains = len(done)
        steps_run = batch.chains * STEPS
        batch.cpu_ms_per_step = (machine_busy_s() - busy0) * 1000 / steps_run
        batch.cpu_parts_ms = {part: spent * 1000 / steps_run
                              for part, spent in clock.stop().items()}
        if len(done) == batch.chains:
            batch.wall_s = max(done) - t0
            batch.steps_per_s = batch.chains * STEPS / batch.wall_s
        else:
            batch.error = f"only {len(done)}/{batch.chains} chains finished in " \
                          f"{self.cfg.batch_timeout_s:.0f}s"
        batch.side_effects, batch.duplicate_side_effects = side_effects(self.r, self.ns.prefix)
        if batch.variant == ONE_WRITE:
            self._count_one_writes(batch)
        if store_url is not None and kind is not None:
            self._verify(batch, store_url, execution_ids)
            grown = store_bytes(self.ctx.servers, self.ns, kind, store_url) - bytes0
            batch.store_bytes_per_step = grown / steps_run
        self.ns.drop_results()

    def _count_one_writes(self, batch: Batch) -> None:
        """The one-write variant's records: one per step, or the batch does not count.
        Dropped afterwards (a 3,000-chain batch leaves 600 MB)."""
        if self.one_write_pg is not None:
            batch.recorded_nodes = _count_and_empty(*self.one_write_pg)
        else:
            base = fx_keys(self.ns.prefix)["one_write"]
            pipe = self.r.pipeline(transaction=False)
            for key in self.r.scan_iter(match=f"{base}:r:*", count=1000):
                pipe.llen(key)
            batch.recorded_nodes = sum(pipe.execute())
            delete_keys(self.ns.redis_url, f"{base}:*")
        if batch.recorded_nodes != batch.chains * STEPS and not batch.error:
            batch.error = f"one-write recorded {batch.recorded_nodes}/{batch.chains * STEPS} steps"

    def _verify(self, batch: Batch, store_url: str, execution_ids: list[str]) -> None:
        """A fast run that recorded nothing is not a result: count what the store holds."""
        store = lai.open_store(store_url)
        try:
            deadline = time.monotonic() + 30  # idempotent steps' writes are write-behind
            while True:
                nodes = done = 0
                for eid in execution_ids:
                    found = store.nodes(eid)
                    nodes += sum(1 for n in found if n.status is Status.SUCCESS)
                    ex = store.get_execution(eid)
                    done += ex is not None and ex.status is ExecutionStatus.COMPLETED
                if (nodes == len(execution_ids) * STEPS and done == len(execution_ids)) \
                        or time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        finally:
            store.close()
        batch.recorded_nodes, batch.completed_executions = nodes, done
        if nodes != len(execution_ids) * STEPS or done != len(execution_ids):
            batch.error = (f"store holds {nodes}/{len(execution_ids) * STEPS} SUCCESS nodes and "
                           f"{done}/{len(execution_ids)} COMPLETED executions")


def _count_and_empty(url: str, schema: str) -> int:
    """Rows the one-write variant wrote to PostgreSQL, then none."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute(f'SELECT count(*) FROM "{schema}".steps').fetchone()
        conn.execute(f'TRUNCATE "{schema}".steps, "{schema}".leases')
    return int(row[0]) if row else 0


@contextmanager
def _one_write_fleet(bench: Bench, kind: str, steps: Steps | None) -> Iterator[None]:
    """The one-write variant's workers while `kind` runs (if --one-write): on PostgreSQL
    they write to tables of a schema of the run's own, elsewhere to Redis."""
    if steps is None:
        yield
        return
    extra: dict[str, str] = {}
    if kind == "postgres":
        url = bench.ctx.servers.postgres_url
        schema = f"{bench.ns.prefix}-one-write"
        execute_sql(url, one_write_tables(schema))
        bench.one_write_pg = (psycopg_url(url), schema)
        extra = {"LT_ONE_WRITE_PG": bench.one_write_pg[0], "LT_ONE_WRITE_SCHEMA": schema}
    fleet = bench.fleet(ONE_WRITE, ONE_WRITE, extra_env=extra)
    try:
        _warm(bench, steps, ONE_WRITE, None)
        yield
    finally:
        bench.problems += fleet.log_problems()
        fleet.stop()
        if bench.one_write_pg is not None:
            execute_sql(bench.ctx.servers.postgres_url,
                        f'DROP SCHEMA "{bench.one_write_pg[1]}" CASCADE')
            bench.one_write_pg = None


def _warm(bench: Bench, steps: Steps, variant: str, store_url: str | None) -> None:
    """Untimed chains first: pool children build their text pool and connect."""
    batch = Batch("warmup", "cpu", variant, -1, bench.cfg.warmup)
    bench.run_batch(batch, steps, WORKS["cpu"], store_url)
    if batch.error:
        raise RuntimeError(f"warm-up of {variant} failed: {batch.error}")


def _one_store(bench: Bench, kind: str, steps: dict[str, Steps]) -> None:
    cfg, ns = bench.cfg, bench.ns
    with migrated_store(bench.ctx, ns, kind) as url:
        lai.install(steps["lai"].plan.app, store=url)  # this process records start() too
        fleet = bench.fleet("lai", "lai", url)  # one queue: the store fleets never overlap
        try:
            _warm(bench, steps["lai"], "lai", url)
            with _one_write_fleet(bench, kind, steps.get(ONE_WRITE)):
                for work_name in cfg.works:
                    for rnd in range(cfg.rounds):
                        _one_round(bench, kind, url, work_name, rnd, steps)
        finally:
            bench.problems += fleet.log_problems()
            fleet.stop()
            close_runtime(timeout_s=10.0)


def _one_round(bench: Bench, kind: str, url: str, work_name: str, rnd: int,
               steps: dict[str, Steps]) -> None:
    """One batch of each variant, the order rotated by the round."""
    variants = bench.cfg.variants
    k = rnd % len(variants)
    for variant in variants[k:] + variants[:k]:
        if bench.out_of_time():
            bench.ctx.log(f"fleet: deadline reached, {kind}/{work_name} "
                          f"round {rnd + 1} {variant} skipped")
            continue
        batch = Batch(kind, work_name, variant, rnd + 1, bench.cfg.chains)
        bench.run_batch(batch, steps[variant], WORKS[work_name],
                        url if variant == "lai" else None)
        bench.batches.append(batch)
        if kind in ("redis", "tiered"):
            delete_keys(bench.ns.redis_url, f"{bench.ns.store_name(kind)}:*")
        bench.ctx.log(_batch_line(batch))


def _batch_line(b: Batch) -> str:
    wall = f"{b.wall_s:6.2f}s {b.steps_per_s:6.1f} steps/s" if b.wall_s else "  FAILED"
    rec = f" recorded {b.recorded_nodes} nodes" if b.recorded_nodes is not None else ""
    err = f"  !! {b.error}" if b.error else ""
    return (f"fleet {b.store:8} {b.work:5} round {b.round} {b.variant:11} {b.chains} chains "
            f"{wall} (publish {b.publish_s:.2f}s){rec}{err}")


def _summarise(cfg: Config, batches: list[Batch]) -> list[dict[str, Any]]:
    rows = []
    for kind in cfg.stores:
        for work in cfg.works:
            walls: dict[str, list[float]] = {v: [] for v in cfg.variants}
            cpus: dict[str, list[float]] = {v: [] for v in cfg.variants}
            parts: dict[str, dict[str, list[float]]] = {v: {p: [] for p in PARTS}
                                                        for v in cfg.variants}
            stored: list[float] = []
            for b in batches:
                if b.store == kind and b.work == work and b.wall_s and not b.error:
                    walls[b.variant].append(b.wall_s)
                    cpus[b.variant].append(b.cpu_ms_per_step or 0.0)
                    for part, ms in b.cpu_parts_ms.items():
                        parts[b.variant][part].append(ms)
                    if b.store_bytes_per_step is not None:
                        stored.append(b.store_bytes_per_step)
            med = {v: median(w) for v, w in walls.items()}
            steps = cfg.chains * STEPS
            sps = {v: (steps / m if m else None) for v, m in med.items()}
            row: dict[str, Any] = {
                "store": kind, "work": work, "chains": cfg.chains, "rounds": len(walls["lai"]),
                "plain_steps_s": sps["plain"], "tuned_steps_s": sps["plain-tuned"],
                "lai_steps_s": sps["lai"],
                # CPU of the whole machine per step: on 2 cores a CPU-bound batch's wall time
                # is this over 2, so the ratio of steps/s follows the ratio of these.
                "plain_cpu_ms": median(cpus["plain"]), "tuned_cpu_ms": median(cpus["plain-tuned"]),
                "lai_cpu_ms": median(cpus["lai"]),
            }
            if sps["plain"] and sps["lai"] and med["plain"] and med["lai"]:
                row["ratio"] = sps["lai"] / sps["plain"]
                row["overhead_ms"] = (med["lai"] - med["plain"]) / steps * WORKERS * 1000
                paired = [p / q for p, q in zip(walls["plain"], walls["lai"], strict=False)]
                row["ratio_rounds"] = [round(x, 3) for x in paired]
            if sps["plain-tuned"] and sps["lai"] and med["plain-tuned"] and med["lai"]:
                row["ratio_vs_tuned"] = sps["lai"] / sps["plain-tuned"]
                row["overhead_vs_tuned_ms"] = (med["lai"] - med["plain-tuned"]) / steps \
                    * WORKERS * 1000
            row.update(_cpu_parts(parts))
            one_write, plain = sps.get(ONE_WRITE), sps["plain"]
            if one_write:
                row["one_write_steps_s"] = one_write
                row["one_write_ratio"] = one_write / plain if plain else None
                row["one_write_cpu_ms"] = median(cpus[ONE_WRITE])
            row["store_bytes_per_step"] = median(stored) if stored else None
            row["target"] = _verdict(kind, work, row)
            rows.append(row)
    return rows


def _cpu_parts(parts: dict[str, dict[str, list[float]]]) -> dict[str, Any]:
    """Each variant's median CPU per step of each part, and what livingai adds to the tuned
    variant on the workers and the servers (the publisher's share is reported apart: it
    is the client's, which start() makes pay for the execution's record)."""
    out: dict[str, Any] = {}
    shorts = {"plain-tuned": "tuned", "lai": "lai", ONE_WRITE: "one_write"}
    for variant, short in shorts.items():
        if variant in parts:
            out[f"{short}_parts_ms"] = {p: median(v) if v else None
                                        for p, v in parts[variant].items()}
    tuned = out["tuned_parts_ms"]
    counted = (*WORKER_PARTS, "redis", "postgres")
    for short, prefix in (("lai", ""), ("one_write", "one_write_")):
        ours = out.get(f"{short}_parts_ms")
        if ours is None:
            continue
        added = {p: ours[p] - tuned[p] for p in PARTS
                 if ours[p] is not None and tuned[p] is not None}
        out[f"{prefix}added_parts_ms"] = added
        if all(p in added for p in counted):
            out[f"{prefix}added_cpu_ms"] = sum(added[p] for p in counted)
    return out


def _parts_rows(summary: list[dict[str, Any]], variant: str = "lai") -> list[dict[str, Any]]:
    def cell(row: dict[str, Any], part: str) -> str | None:
        tuned = row["tuned_parts_ms"].get(part)
        ours = row.get(f"{variant}_parts_ms", {}).get(part)
        if tuned is None or ours is None:
            return None
        return f"{tuned:.3f} / {ours:.3f} ({ours - tuned:+.3f})"
    return [{"store": r["store"], "work": r["work"], **{p: cell(r, p) for p in PARTS}}
            for r in summary]


def _verdict(kind: str, work: str, row: dict[str, Any]) -> str | None:
    """The per-step cost issue's targets that apply to this row, met or not."""
    said = []
    target = RATIO_TARGETS.get((kind, work))
    if target is not None and row.get("ratio") is not None:
        said.append(f"ratio >= {target}: " + ("met" if row["ratio"] >= target else "NOT met"))
    limit = ADDED_CPU_TARGETS_MS.get(kind)
    if work == "noop" and limit is not None and row.get("added_cpu_ms") is not None:
        said.append(f"added cpu <= {limit} ms: "
                    + ("met" if row["added_cpu_ms"] <= limit else "NOT met"))
    return "; ".join(said) or None


def run(ctx: RunContext) -> dict[str, Any]:
    cfg = _config(ctx)
    ns = Namespace(f"{ctx.run_tag}f", ctx.servers.redis_url)
    bench = Bench(ctx, cfg, ns, ctx.results_dir / "fleet-logs" / ns.tag)
    load_before = load_average()
    library_before = library_state()
    ctx.log(f"fleet: {cfg.chains} chains x {STEPS} steps, {cfg.rounds} rounds, stores "
             f"{','.join(cfg.stores)}, work {','.join(cfg.works)}, {WORKERS} workers -c 1 "
             f"per variant, task events {'on' if cfg.events else 'off'}; load {load_before}")
    fleets: list[Fleet] = []
    try:
        # One app per variant for the whole run (each mode's tasks have their own names).
        steps = {mode: make_app(mode, prefix=ns.prefix, redis_url=ns.redis_url, queue=mode)[1]
                 for mode in cfg.variants}
        for mode in ("plain", "plain-tuned"):  # one-write and lai: each store starts its own
            fleets.append(bench.fleet(mode, mode))
            _warm(bench, steps[mode], mode, None)
        for kind in cfg.stores:
            try:
                _one_store(bench, kind, steps)
            except Exception as exc:  # noqa: BLE001 - one broken store must not lose the rest
                bench.problems.append(f"{kind}: {type(exc).__name__}: {exc}")
                ctx.log(f"!! fleet {kind} failed: {type(exc).__name__}: {exc}")
    finally:
        for fleet in fleets:
            bench.problems += fleet.log_problems()
            fleet.stop()
        ns.cleanup()
        bench.r.close()
    summary = _summarise(cfg, bench.batches)
    columns = ["store", "work", "plain_steps_s", "tuned_steps_s", "lai_steps_s", "ratio",
               "overhead_ms", "ratio_vs_tuned", "overhead_vs_tuned_ms", "plain_cpu_ms",
               "tuned_cpu_ms", "lai_cpu_ms", "added_cpu_ms", "store_bytes_per_step",
               "target"]
    if cfg.one_write:
        columns[5:5] = ["one_write_steps_s", "one_write_ratio"]
        columns.insert(-2, "one_write_added_cpu_ms")
    load_after = load_average()
    text = (table(summary, columns)
            + "\n\nCPU ms per step of each part, tuned / livingai (+ added):\n"
            + table(_parts_rows(summary), ["store", "work", *PARTS])
            + ("\n\nCPU ms per step of each part, tuned / one-write (+ added):\n"
               + table(_parts_rows(summary, "one_write"), ["store", "work", *PARTS])
               if cfg.one_write else "")
            + f"\n\nload average before {load_before}, after {load_after} (1/5/15 min, 2 cores)"
            + ("\nproblems:\n  " + "\n  ".join(bench.problems) if bench.problems else ""))
    result: dict[str, Any] = {
        "description": DESCRIPTION,
        "params": {**asdict(cfg), "workers": f"{WORKERS} worker processes per variant, "
                   "prefork -c 1 each", "broker": "redis", "result_backend": "redis (stored)",
                   "works": {w: WORKS[w].to_dict() for w in cfg.works}},
        "rows": {f"{r['store']} {r['work']}": {
            "store": r["store"], "livingai": None,
            "livingai_note": "fleet compares against plain Celery, not livingai 0.4.1",
            "ours": {k: v for k, v in r.items() if k not in ("store", "work")}}
            for r in summary},
        "summary": summary,
        "batches": [asdict(b) for b in bench.batches],
        "problems": bench.problems,
        "load_average": {"before": load_before, "after": load_after},
        "library": {"before": library_before, "after": library_state()},
        "table": text,
    }
    ctx.write_json(NAME, result)
    return result


def _works(text: str) -> str:
    unknown = [w for w in text.split(",") if w not in WORKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown work {unknown[0]!r}; choose from "
                                         f"{', '.join(WORKS)}")
    return text


def add_options(parser: argparse.ArgumentParser) -> None:
    """The flags of `python -m loadtest.fleet`, on top of --quick, --out and --stores."""
    parser.add_argument("--chains", type=int, help="chains per batch (default 300, quick 30)")
    parser.add_argument("--rounds", type=int, help="rounds of alternating batches (default 3)")
    parser.add_argument("--works", type=_works,
                        help=f"comma-separated, from {','.join(WORKS)} (default cpu,llm20; "
                        "noop: no work, the state carried on)")
    parser.add_argument("--batch-timeout-s", dest="batch_timeout_s", type=float)
    parser.add_argument("--deadline-s", dest="deadline_s", type=float)
    parser.add_argument("--events", action="store_true", default=None,
                        help="task events on in every variant, as on a fleet Flower watches")
    parser.add_argument("--one-write", dest="one_write", action="store_true", default=None,
                        help="a fourth variant: plain-tuned + one write of each step's input "
                        "and output after it ran (PostgreSQL while the postgres store runs, "
                        "else Redis): the cost of one write, measured")

