"""The waits benchmark's app: one step that waits for an event, one that does not.

    hold(run_id)    an idempotent @agent_step whose first act is lai.wait_for("go"): it
                    suspends (WAITING, its worker slot freed) until lai.send(eid, "go")
    fresh(run_id)   an @agent_step that only notes when its body ran: a new execution
                    started while thousands wait shows whether any slot is still held
    timer(run_id, timeout_s)  waits for an event nobody sends: the recovery tick wakes it
                    at its deadline with WaitTimeout (the tick's path, not send's)

What the bodies note goes straight to Redis under the run's prefix (`marks()`), outside our
stores: which executions reached their wait, when a woken body started again and when its
wait_for returned, when a fresh body ran. The times are time.time() on the same machine as
the driver, so the driver subtracts them from its own clock.

Workers and beat load it with `celery -A loadtest.waits.app` (LT_PREFIX, LT_REDIS,
LIVINGAI_STORE in their environment); the app is built from the environment only then
(module __getattr__), so importing this module builds nothing.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, NamedTuple

from celery import Celery

import livingai_tasks as lai

from ..core.lazy_app import lazy_app, process_redis
from ..core.library import RECOVER_TASK

__all__ = ["Steps", "make_app", "marks", "EVENT"]

EVENT = "go"


def marks(prefix: str) -> dict[str, str]:
    """Where the bodies note what happened (outside our stores)."""
    base = f"{prefix}-fx"
    return {"reached": f"{base}:reached",  # set: executions whose body reached wait_for
            "resumed": f"{base}:resumed",  # hash: eid -> JSON {start, returned} of the woken run
            "resumes": f"{base}:resumes",  # hash: eid -> how often wait_for returned (once)
            "fresh": f"{base}:fresh",  # hash: run id -> time its body ran
            "timer_due": f"{base}:timer-due",  # hash: eid -> when its timeout is due
            "timer_woken": f"{base}:timer-woken"}  # hash: eid -> when the timed-out run began


class Steps(NamedTuple):
    hold: Any
    fresh: Any
    timer: Any


_redis = process_redis  # this process's own client (core/lazy_app.py)


def _register(app: Celery, prefix: str, timeout_s: float | None) -> Steps:
    keys = marks(prefix)

    @lai.agent_step(app, name="lt.wait.hold", shared=False)
    def hold(run_id: str) -> dict[str, Any]:
        started = time.time()
        eid = lai.current_execution_id()
        # Noted before the wait: the driver counts arrivals with it, then asks the store
        # how many are really WAITING.
        _redis().sadd(keys["reached"], str(eid))
        payload = lai.wait_for(EVENT, timeout=timeout_s)
        returned = time.time()
        pipe = _redis().pipeline(transaction=False)
        pipe.hset(keys["resumed"], str(eid), json.dumps({"start": started, "returned": returned}))
        pipe.hincrby(keys["resumes"], str(eid), 1)
        pipe.execute()
        return {"run": run_id, "payload": payload}

    @lai.agent_step(app, name="lt.wait.fresh", shared=False)
    def fresh(run_id: str) -> str:
        _redis().hset(keys["fresh"], run_id, repr(time.time()))
        return run_id

    @lai.agent_step(app, name="lt.wait.timer", shared=False)
    def timer(run_id: str, timeout_s: float) -> str:
        started = time.time()
        eid = str(lai.current_execution_id())
        # The first run notes when its wait is due (wait_for sets its deadline to now +
        # timeout a few microseconds later); a re-run keeps the first note.
        _redis().hsetnx(keys["timer_due"], eid, repr(time.time() + timeout_s))
        try:
            lai.wait_for("never-sent", timeout=timeout_s)
        except lai.WaitTimeout:
            _redis().hset(keys["timer_woken"], eid, repr(started))
        return run_id

    return Steps(hold, fresh, timer)


def make_app(*, prefix: str, redis_url: str, store: str | None = None,
             timeout_s: float | None = None, queue: str = "steps",
             recovery_queue: str = "recovery") -> tuple[Celery, Steps]:
    """The app with every Redis key under `prefix` and livingai_tasks installed (the store
    from `store`, else LIVINGAI_STORE); `timeout_s` is every wait's timeout (None: none)."""
    app = Celery("lt-waits", broker=redis_url, backend=redis_url)
    celery_keys = {"global_keyprefix": f"{prefix}-celery:"}
    app.conf.update(
        task_default_queue=queue,
        broker_transport_options=celery_keys,
        result_backend_transport_options=celery_keys,
        broker_connection_retry_on_startup=True,
        result_expires=3600,
        task_serializer="json", result_serializer="json", accept_content=["json"],
        # The tick has a queue of its own, so a backlog of steps cannot make it expire.
        task_routes={RECOVER_TASK: {"queue": recovery_queue}},
    )
    lai.install(app, store=store)
    return app, _register(app, prefix, timeout_s)


def _from_env() -> Celery:
    env = os.environ
    timeout = float(env.get("LT_WAIT_TIMEOUT_S") or 0)
    app, _ = make_app(prefix=env["LT_PREFIX"],
                      redis_url=env.get("LT_REDIS", "redis://127.0.0.1:6379/0"),
                      timeout_s=timeout if timeout > 0 else None)
    return app


__getattr__ = lazy_app(__name__, _from_env)
