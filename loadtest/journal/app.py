"""The journal benchmark's app: two steps that run an agent (agents.py).

    overhead(kind, journaled, calls, sample)   runs the agent once, journaled or not, and
                    pushes its timings to Redis: the wall clock and the process's CPU time
                    at every model call, around the run, and around the flush after it
                    (until the journal's write-behind reached the store)
    resume(kind, run_id, calls, pause_turn)    runs the journaled agent; its model counts
                    each call in Redis per turn, and the first time turn `pause_turn` comes
                    it blocks there *before* counting it, so the driver can SIGKILL the
                    worker with exactly `pause_turn` calls made and recorded

What the bodies note goes straight to Redis under the run's prefix (`marks()`), outside our
stores. Times are time.time() on the driver's machine.

Workers load it with `celery -A loadtest.journal.app` (LT_PREFIX, LT_REDIS, LT_AGENTS: the
agent kinds to build at load, LIVINGAI_STORE and the LIVINGAI_* settings in their
environment); the app is built from the environment only then (module __getattr__), so
importing this module builds nothing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, NamedTuple

from celery import Celery

import livingai_tasks as lai

from ..core.lazy_app import lazy_app, process_redis
from ..core.library import RECOVER_TASK, flush_runtime
from .agents import Probe, prepare, run_agent

__all__ = ["Steps", "make_app", "marks", "HOLD_S"]

HOLD_S = 300.0  # how long the paused model call blocks: the driver kills it long before


def marks(prefix: str) -> dict[str, str]:
    """Where the bodies note what happened (outside our stores); `<key>:<run id>`."""
    base = f"{prefix}-fx"
    return {"overhead": f"{base}:overhead",  # list: one JSON per overhead run
            "calls": f"{base}:calls",  # hash per run: turn -> model calls counted
            "paused": f"{base}:paused",  # string per run: the pid blocked at pause_turn
            "starts": f"{base}:starts",  # list per run: JSON {at, pid} of each body start
            "done": f"{base}:done"}  # string per run: JSON {at, output} when it finished


class Steps(NamedTuple):
    overhead: Any
    resume: Any


_redis = process_redis  # this process's own client (core/lazy_app.py)


class _Counting(Probe):
    """The resume run's probe: counts each model call per turn, and blocks once at
    `pause_turn` (before counting it) until the driver's SIGKILL."""

    def __init__(self, keys: dict[str, str], run_id: str, pause_turn: int) -> None:
        super().__init__()
        self.keys, self.run_id, self.pause_turn = keys, run_id, pause_turn

    def on_call(self, turn: int) -> None:
        client = _redis()
        if turn == self.pause_turn and client.set(f"{self.keys['paused']}:{self.run_id}",
                                                  os.getpid(), nx=True, ex=3600):
            deadline = time.monotonic() + HOLD_S
            while time.monotonic() < deadline:
                time.sleep(0.05)
        client.hincrby(f"{self.keys['calls']}:{self.run_id}", str(turn), 1)


def _register(app: Celery, prefix: str) -> Steps:
    keys = marks(prefix)

    @lai.agent_step(app, name="lt.journal.overhead", shared=False)
    def overhead(kind: str, journaled: bool, calls: int, sample: str) -> str:
        probe = Probe()
        wall0, cpu0 = time.perf_counter(), time.process_time()
        output = run_agent(kind, calls, journaled, probe)
        wall1, cpu1 = time.perf_counter(), time.process_time()
        flushed = flush_runtime(30.0)
        wall2, cpu2 = time.perf_counter(), time.process_time()
        # One segment per model call: from the run's start (or the previous call) to the
        # next call (or the run's end), so the segments add up to the run.
        walls = [wall0, *probe.wall[1:], wall1]
        cpus = [cpu0, *probe.cpu[1:], cpu1]
        _redis().rpush(keys["overhead"], json.dumps({
            "sample": sample, "kind": kind, "journaled": journaled, "calls": len(probe.wall),
            "pid": os.getpid(), "flushed": flushed,
            "call_wall_ms": [(b - a) * 1000 for a, b in zip(walls, walls[1:], strict=False)],
            "call_cpu_ms": [(b - a) * 1000 for a, b in zip(cpus, cpus[1:], strict=False)],
            "run_wall_ms": (wall1 - wall0) * 1000, "run_cpu_ms": (cpu1 - cpu0) * 1000,
            "flush_wall_ms": (wall2 - wall1) * 1000, "flush_cpu_ms": (cpu2 - cpu1) * 1000}))
        return output

    @lai.agent_step(app, name="lt.journal.resume", shared=False)
    def resume(kind: str, run_id: str, calls: int, pause_turn: int) -> str:
        client = _redis()
        client.rpush(f"{keys['starts']}:{run_id}",
                     json.dumps({"at": time.time(), "pid": os.getpid()}))
        output = run_agent(kind, calls, True, _Counting(keys, run_id, pause_turn))
        client.set(f"{keys['done']}:{run_id}", json.dumps({"at": time.time(),
                                                           "output": output}))
        return output

    return Steps(overhead, resume)


def make_app(*, prefix: str, redis_url: str, store: str | None = None,
             settings: dict[str, float] | None = None) -> tuple[Celery, Steps]:
    """The app with every Redis key under `prefix` and livingai_tasks installed (the store
    from `store`, else LIVINGAI_STORE; `settings` as install() keywords, else the
    environment's LIVINGAI_* and the defaults)."""
    app = Celery("lt-journal", broker=redis_url, backend=redis_url)
    celery_keys = {"global_keyprefix": f"{prefix}-celery:"}
    app.conf.update(
        task_default_queue="steps",
        broker_transport_options=celery_keys,
        result_backend_transport_options=celery_keys,
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        task_routes={RECOVER_TASK: {"queue": "recovery"}},
    )
    lai.install(app, store=store, **(settings or {}))
    return app, _register(app, prefix)


def _from_env() -> Celery:
    env = os.environ
    app, _ = make_app(prefix=env["LT_PREFIX"],
                      redis_url=env.get("LT_REDIS", "redis://127.0.0.1:6379/0"))
    prepare(env.get("LT_AGENTS", "").split(","))
    return app


# `celery -A loadtest.journal.app` asks for `app`: built from the environment, once.
__getattr__ = lazy_app(__name__, _from_env)
