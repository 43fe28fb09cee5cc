"""The benchmark's agent: the same five step bodies, registered as plain Celery tasks or as
livingai_tasks steps, on one Redis broker under one run's key prefix.

    plan -> research -> draft -> act (non-idempotent tool) -> summarize

Each step does what an agent step does around a model call, without the model: it reads the
transcript (a ~20 KB JSON state from loadtest.state), digests and counts it a few times
(`cpu_rounds`, ~0.5 ms each on this machine), appends a turn, and optionally sleeps to stand
in for the LLM's latency (`sleep_ms`). `act` is the side effect that must happen once: it
counts itself in a Redis hash keyed by its idempotency key, outside every store of ours, so a
run can prove how often it really happened.

The side-effect counters always go straight to LT_REDIS; the broker (and the result backend,
if the broker is Redis) to LT_BROKER if set (RabbitMQ, or the chaos run's proxy, which it cuts
for a broker outage), else LT_REDIS.

Modes (LT_MODE in a worker's environment; LT_EVENTS=1 adds task events to any of them):
    plain        Celery's defaults (early ack): what a Celery user runs today
    plain-tuned  acks_late + the Celery settings install() applies: Celery alone, crash-aware
    one-write    plain-tuned + one write per step after it ran (its input and output, one
                 round trip, no condition; to Redis, or PostgreSQL with LT_ONE_WRITE_PG and
                 LT_ONE_WRITE_SCHEMA): what "a step for about one write" costs
    lai          livingai_tasks.install() with 4 @agent_step + 1 @tool_step(reconcile=...)

Workers and beat load it with `celery -A loadtest.fleet.app`; the app is built from the
environment only then (module __getattr__), so importing this module builds nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
import uuid
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple

import orjson
import redis
from celery import Celery, chain
from celery.signals import task_postrun, task_prerun

import livingai_tasks as lai

from ..core.lazy_app import lazy_app, process_redis
from ..core.library import INSTALL_CELERY_SETTINGS, RECOVER_TASK, engine_metrics
from ..core.state import agent_state

__all__ = ["MODES", "Work", "Steps", "make_app", "fx_keys", "side_effects", "STEP_NAMES",
           "one_write_tables"]

MODES = ("plain", "plain-tuned", "one-write", "lai")
STEP_NAMES = ("plan", "research", "draft", "act", "summarize")


@dataclass(frozen=True)
class Work:
    """How heavy each step is; travels inside the state, so one worker serves every variant."""

    state_bytes: int = 20_000
    cpu_rounds: int = 5
    sleep_ms: tuple[float, float] = (0.0, 0.0)  # uniform in [lo, hi]
    trace: bool = False  # record each body start and reconcile call (chaos)
    # lai mode: lai.checkpoint() calls in each of research and draft, each timed by the
    # body and noted with a marker of its own (chaos: records lost, longest hold)
    checkpoints: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def fx_keys(prefix: str) -> dict[str, str]:
    """Where the steps count what really happened (outside our stores)."""
    base = f"{prefix}-fx"
    return {"effects": f"{base}:effects",  # hash: effect key -> times the side effect ran
            "effect_run": f"{base}:effect-run",  # hash: effect key -> run id
            "done": f"{base}:done",  # hash: run id -> time summarize finished
            "starts": f"{base}:starts",  # list of JSON: one per step body start (trace)
            "checkpoints": f"{base}:checkpoints",  # list of JSON: one per checkpoint() call
            "metrics": f"{base}:metrics",  # hash: pid -> the engine's metrics, JSON
            "reconciles": f"{base}:reconciles",  # list of JSON: one per reconcile call
            # one-write mode: a list of step records per canvas root, and a hash of leases
            "one_write": f"{base}:one-write"}


def side_effects(client: redis.Redis, prefix: str) -> tuple[int, int]:
    """How often `act`'s side effect ran in all, and how many of those were repeats of a
    key that had already run (charged twice)."""
    counts = [int(v) for v in client.hvals(fx_keys(prefix)["effects"])]
    return sum(counts), sum(c - 1 for c in counts if c > 1)


class Steps(NamedTuple):
    plan: Any
    research: Any
    draft: Any
    act: Any
    summarize: Any

    def canvas(self, run_id: str, work: Work, goal: str = "close the books for March") -> Any:
        return chain(self.plan.s(goal, run_id, work.to_dict()), self.research.s(),
                     self.draft.s(), self.act.s(), self.summarize.s())


# -- the step bodies (shared by every mode) ----------------------------------------------

_redis = process_redis  # this process's own client (core/lazy_app.py)


def _think(state: dict[str, Any], step: str, *, sleep_share: float = 1.0) -> None:
    work = state["work"]
    text = json.dumps(state["messages"], separators=(",", ":"))
    for _ in range(int(work["cpu_rounds"])):
        text = json.dumps(state["messages"], separators=(",", ":"))
        digest = hashlib.sha256(text.encode()).hexdigest()
        state["trace"].append({"step": step, "digest": digest[:16],
                               "vocabulary": len(Counter(text.split()))})
        del state["trace"][:-8]  # a bounded trace: the state keeps its size along the chain
    # The new turn replaces the oldest one, for the same reason.
    turn = {"role": "assistant", "content": f"[{step}] " + text[len(text) // 3:][:600]}
    state["messages"] = [*state["messages"][1:], turn] if state["messages"] else [turn]
    lo, hi = work["sleep_ms"]
    if hi > 0 and sleep_share > 0:
        time.sleep(random.uniform(lo, hi) * sleep_share / 1000)


def _trace(prefix: str, task: Any, step: str, run_id: str, work: dict[str, Any]) -> None:
    """With work.trace on, note when a body starts (chaos measures resumes with it)."""
    if not work["trace"]:
        return
    event = {"t": time.time(), "task_id": task.request.id, "step": step, "run": run_id,
             "pid": os.getpid(), "eid": lai.current_execution_id()}
    _redis().rpush(fx_keys(prefix)["starts"], json.dumps(event))


def _checkpoints(prefix: str, task: Any, step: str, state: dict[str, Any]) -> None:
    """`work.checkpoints` calls of lai.checkpoint(), each timed as the agent sees it (from
    call to return) and carrying a marker of its own, so the run can find each one in the
    store afterwards; then this process's engine metrics, for the longest hold it saw."""
    count = int(state["work"].get("checkpoints", 0))
    if count <= 0:
        return
    keys = fx_keys(prefix)
    notes = []
    for i in range(count):
        state["ck"] = f"{task.request.id}:{step}:{i}:{uuid.uuid4().hex[:8]}"
        start = time.perf_counter()
        said = lai.checkpoint(state)
        held_ms = (time.perf_counter() - start) * 1000
        # True/False today; a richer answer (durable, queued, spilled...) kept as its name.
        outcome = said if isinstance(said, bool) else str(getattr(said, "value", said))
        notes.append(json.dumps({"ck": state["ck"], "held_ms": round(held_ms, 3),
                                 "durable": outcome, "t": time.time(), "pid": os.getpid(),
                                 "eid": lai.current_execution_id()}))
    state.pop("ck", None)
    pipe = _redis().pipeline(transaction=False)
    pipe.rpush(keys["checkpoints"], *notes)
    pipe.hset(keys["metrics"], str(os.getpid()),
              json.dumps({"t": time.time(), **engine_metrics()}))
    pipe.execute()


def _plan(goal: str, run_id: str, work: dict[str, Any]) -> dict[str, Any]:
    agent = zlib.crc32(run_id.encode()) % 10_000
    state: dict[str, Any] = json.loads(agent_state(int(work["state_bytes"]), agent=agent))
    state.update(goal=goal, run=run_id, work=work, trace=[])
    _think(state, "plan")
    return state


def _act(prefix: str, key: str, state: dict[str, Any]) -> dict[str, Any]:
    keys = fx_keys(prefix)
    _think(state, "act", sleep_share=0.5)  # before the call: a kill here means "not charged"
    pipe = _redis().pipeline(transaction=True)
    pipe.hincrby(keys["effects"], key, 1)
    pipe.hset(keys["effect_run"], key, state["run"])
    pipe.execute()
    lo, hi = state["work"]["sleep_ms"]
    time.sleep(random.uniform(lo, hi) / 2000)  # the provider's answer: a kill here is in doubt
    return {**state, "charge": {"key": key, "amount_cents": 4200}}


def _summarize(prefix: str, state: dict[str, Any]) -> dict[str, Any]:
    _think(state, "summarize")
    _redis().hset(fx_keys(prefix)["done"], state["run"], repr(time.time()))
    return {"run": state["run"], "charge": state.get("charge"), "turns": len(state["trace"])}


# One-write mode on PostgreSQL: the step's record and its canvas's lease in one statement
# (one round trip, one commit), in tables of the run's own schema (one_write_tables()).
_ONE_WRITE_SQL = (
    'WITH step AS (INSERT INTO "{schema}".steps (root, record) VALUES (%(root)s, %(record)s)) '
    'INSERT INTO "{schema}".leases (root, t) VALUES (%(root)s, now()) '
    "ON CONFLICT (root) DO UPDATE SET t = excluded.t")


def one_write_tables(schema: str) -> str:
    """The DDL of one-write mode's tables on PostgreSQL, in `schema` (created here). The
    record is stored uncompressed, as the SQL store keeps a node's body (sql_schema.py):
    with PostgreSQL's default pglz, compressing a 40 KB record cost the server ~0.8 ms of
    CPU per insert here, ten times the rest of the insert."""
    return (f'CREATE SCHEMA "{schema}"; '
            f'CREATE TABLE "{schema}".steps (id bigserial PRIMARY KEY, root text NOT NULL, '
            "record text NOT NULL); "
            f'ALTER TABLE "{schema}".steps ALTER COLUMN record SET STORAGE EXTERNAL; '
            f'CREATE TABLE "{schema}".leases (root text PRIMARY KEY, t timestamptz NOT NULL)')


def _one_write_sink(prefix: str, postgres: tuple[str, str] | None) -> Callable[[str, bytes], None]:
    """Where one-write mode writes a step's record: Redis (RPUSH to the canvas's list and
    HSET of its lease, one pipelined round trip) or, with `postgres` = (a psycopg URL, a
    schema), one autocommitted statement. The connection is made in the process that
    writes (a pool child, after the fork)."""
    if postgres is None:
        key = fx_keys(prefix)["one_write"]

        def to_redis(root: str, record: bytes) -> None:
            pipe = _redis().pipeline(transaction=False)
            pipe.rpush(f"{key}:r:{root}", record)
            pipe.hset(f"{key}:leases", root, time.time())
            pipe.execute()
        return to_redis
    import psycopg

    url, schema = postgres
    sql = _ONE_WRITE_SQL.format(schema=schema)
    conns: dict[int, Any] = {}

    def to_postgres(root: str, record: bytes) -> None:
        conn = conns.get(os.getpid())
        if conn is None:
            conn = conns[os.getpid()] = psycopg.connect(url, autocommit=True)
        conn.execute(sql, {"root": root, "record": record.decode()})
    return to_postgres


def _record_one_write(prefix: str, postgres: tuple[str, str] | None) -> None:
    """One-write mode: each step's input encoded before its body runs (a body may change
    its arguments in place), then after it one round trip writing the input and output as
    one JSON record with its canvas's lease (_one_write_sink). No read, no condition, no
    thread: the least a recorder of every step could pay, to set livingai's cost beside."""
    write = _one_write_sink(prefix, postgres)
    inputs: dict[str, bytes] = {}

    def ours(task: Any) -> bool:
        return bool(task.name.startswith("lt.one-write."))

    def before(task_id: str, task: Any, args: Any, kwargs: Any, **_: Any) -> None:
        if ours(task):
            inputs[task_id] = orjson.dumps({"args": args, "kwargs": kwargs}, default=repr)

    def after(task_id: str, task: Any, retval: Any, state: str, **_: Any) -> None:
        if not ours(task):
            return
        outcome = orjson.dumps({"id": task_id, "task": task.name, "state": state,
                                "output": retval, "t": time.time()}, default=repr)
        # {"input": ..., <the outcome's fields>}: one JSON object, the input not re-encoded
        write(task.request.root_id or task_id,
              b'{"input":' + inputs.pop(task_id, b"null") + b"," + outcome[1:])

    task_prerun.connect(before, weak=False, dispatch_uid=f"lt-one-write-in-{prefix}")
    task_postrun.connect(after, weak=False, dispatch_uid=f"lt-one-write-{prefix}")


# -- registration --------------------------------------------------------------------------


def _register_plain(app: Celery, prefix: str, mode: str) -> Steps:
    # shared=False: Celery adds a shared task to every app created later, and the benchmark
    # process builds one app per variant (and per store run).
    opts: dict[str, Any] = {"bind": True, "acks_late": mode != "plain", "shared": False}

    @app.task(name=f"lt.{mode}.plan", **opts)  # type: ignore[untyped-decorator]
    def plan(self: Any, goal: str, run_id: str, work: dict[str, Any]) -> dict[str, Any]:
        _trace(prefix, self, "plan", run_id, work)
        return _plan(goal, run_id, work)

    def middle(step: str) -> Any:
        @app.task(name=f"lt.{mode}.{step}", **opts)  # type: ignore[untyped-decorator]
        def body(self: Any, state: dict[str, Any]) -> dict[str, Any]:
            _trace(prefix, self, step, state["run"], state["work"])
            _think(state, step)
            return state
        return body

    @app.task(name=f"lt.{mode}.act", **opts)  # type: ignore[untyped-decorator]
    def act(self: Any, state: dict[str, Any]) -> dict[str, Any]:
        _trace(prefix, self, "act", state["run"], state["work"])
        return _act(prefix, f"plain-{state['run']}", state)

    @app.task(name=f"lt.{mode}.summarize", **opts)  # type: ignore[untyped-decorator]
    def summarize(self: Any, state: dict[str, Any]) -> dict[str, Any]:
        _trace(prefix, self, "summarize", state["run"], state["work"])
        return _summarize(prefix, state)

    return Steps(plan, middle("research"), middle("draft"), act, summarize)


def _register_lai(app: Celery, prefix: str) -> Steps:
    @lai.agent_step(app, name="lt.lai.plan", bind=True, shared=False)
    def plan(self: Any, goal: str, run_id: str, work: dict[str, Any]) -> dict[str, Any]:
        _trace(prefix, self, "plan", run_id, work)
        return _plan(goal, run_id, work)

    def middle(step: str) -> Any:
        @lai.agent_step(app, name=f"lt.lai.{step}", bind=True, shared=False)
        def body(self: Any, state: dict[str, Any]) -> dict[str, Any]:
            _trace(prefix, self, step, state["run"], state["work"])
            _think(state, step)
            _checkpoints(prefix, self, step, state)
            return state
        return body

    def charged_already(key: str, state: dict[str, Any]) -> lai.Reconciled:
        """Ask 'the payment provider' (the effects hash) whether this key went through."""
        keys = fx_keys(prefix)
        found = _redis().hget(keys["effects"], key)
        if state["work"]["trace"]:
            _redis().rpush(keys["reconciles"], json.dumps(
                {"t": time.time(), "key": key, "found": found is not None, "run": state["run"],
                 "eid": lai.current_execution_id(), "pid": os.getpid()}))
        if found is None:
            return lai.Reconciled(done=False)
        return lai.Reconciled(done=True, output={
            **state, "charge": {"key": key, "amount_cents": 4200, "reconciled": True}})

    @lai.tool_step(app, name="lt.lai.act", reconcile=charged_already, bind=True,
                   shared=False)
    def act(self: Any, state: dict[str, Any]) -> dict[str, Any]:
        _trace(prefix, self, "act", state["run"], state["work"])
        return _act(prefix, lai.idempotency_key(), state)

    @lai.agent_step(app, name="lt.lai.summarize", bind=True, shared=False)
    def summarize(self: Any, state: dict[str, Any]) -> dict[str, Any]:
        _trace(prefix, self, "summarize", state["run"], state["work"])
        return _summarize(prefix, state)

    return Steps(plan, middle("research"), middle("draft"), act, summarize)


def make_app(mode: str, *, prefix: str, redis_url: str, queue: str = "steps",
             recovery_queue: str = "recovery", store: str | None = None,
             events: bool = False, broker_url: str | None = None,
             one_write_postgres: tuple[str, str] | None = None) -> tuple[Celery, Steps]:
    """The benchmark app in `mode`, with every Redis key under `prefix`; `events` turns
    task events on whatever the mode, as on a fleet Flower watches. `broker_url` (default
    `redis_url`): the broker, and the result backend if it is Redis, e.g. the same Redis
    through a TCP proxy the chaos run cuts, or RabbitMQ (results then go to `redis_url`).
    `one_write_postgres` (a psycopg URL, a schema): where one-write mode writes, if not to
    Redis."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}.")
    broker = broker_url or redis_url
    # Results stay in Redis whatever the broker (an AMQP broker is no result backend here).
    backend = broker if broker.startswith(("redis://", "rediss://")) else redis_url
    app = Celery(f"lt-{mode}", broker=broker, backend=backend)
    celery_keys = {"global_keyprefix": f"{prefix}-celery:"}
    app.conf.update(
        task_default_queue=queue,
        broker_transport_options=celery_keys,  # queues, unacked hash, bindings
        result_backend_transport_options=celery_keys,  # celery-task-meta-* keys
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        # The recovery tick gets a queue of its own: behind a backlog of steps in the step
        # queue it would wait longer than its `expires` (one interval) and never run.
        task_routes={RECOVER_TASK: {"queue": recovery_queue}},
        worker_send_task_events=events,
    )
    if mode == "lai":
        lai.install(app, store=store)
        return app, _register_lai(app, prefix)
    if mode in ("plain-tuned", "one-write"):
        # The Celery settings install() applies, without our recording.
        app.conf.update(INSTALL_CELERY_SETTINGS)
    if mode == "one-write":
        _record_one_write(prefix, one_write_postgres)
    return app, _register_plain(app, prefix, mode)


def _from_env() -> Celery:
    env = os.environ
    # The text pool (~1 s to build) is built here, in the worker's main process, so pool
    # children inherit it through fork instead of each paying for it before its first step.
    agent_state(1_000)
    app, _ = make_app(env.get("LT_MODE", "lai"), prefix=env["LT_PREFIX"],
                      redis_url=env.get("LT_REDIS", "redis://127.0.0.1:6379/0"),
                      queue=env.get("LT_QUEUE", "steps"),
                      recovery_queue=env.get("LT_RECOVERY_QUEUE", "recovery"),
                      events=env.get("LT_EVENTS") == "1",
                      broker_url=env.get("LT_BROKER") or None,
                      one_write_postgres=(env["LT_ONE_WRITE_PG"], env["LT_ONE_WRITE_SCHEMA"])
                      if env.get("LT_ONE_WRITE_PG") else None)
    return app


__getattr__ = lazy_app(__name__, _from_env)
