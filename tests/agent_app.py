"""The Celery app the real-worker tests run: configured from the environment, so a test can
start worker processes on its own queue, broker and store.

Side effects are counted in Redis (LAI_TEST_COUNTERS prefix), outside any store of ours, so
a test can assert how often a tool really ran.
"""

from __future__ import annotations

import os
import time
from typing import Any

import redis
from celery import Celery, current_task, signals

import livingai_tasks as lai
from livingai_tasks.stores.sql import SQLStore

BROKER = os.environ.get("LAI_TEST_BROKER", "redis://127.0.0.1:6379/0")
BACKEND = os.environ.get("LAI_TEST_BACKEND", "redis://127.0.0.1:6379/0")
QUEUE = os.environ.get("LAI_TEST_QUEUE", "lai-test")
COUNTERS = os.environ.get("LAI_TEST_COUNTERS", "laitest-counters")
REDIS_URL = os.environ.get("LIVINGAI_TEST_REDIS", "redis://127.0.0.1:6379/0")

app = Celery("agent_app", broker=BROKER, backend=BACKEND)
app.conf.update(
    task_default_queue=QUEUE,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    result_expires=3600,
)
_redis: redis.Redis | None = None


def count(name: str, by: int = 1) -> int:
    """Record a real side effect: INCR of a Redis counter the test reads back."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(REDIS_URL)
    return int(_redis.incrby(f"{COUNTERS}:{name}", by))


def _pause(name: str) -> None:
    """Sleep while the test holds a 'pause' flag for this step, so it can kill a worker at a
    precise point (the flag, not a fixed sleep, decides how long)."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(REDIS_URL)
    deadline = time.time() + 60
    while _redis.exists(f"{COUNTERS}:pause:{name}") and time.time() < deadline:
        time.sleep(0.05)


@signals.task_prerun.connect(weak=False)
def _pause_before_start(task: Any = None, kwargs: Any = None, **_: Any) -> None:
    """Hold a step after its worker took the message and before livingai records its start
    (this receiver is connected before install()'s): a test pauses a worker between two
    steps with the flag "before:<name>" (the step's name= argument, else its function's)."""
    if task is not None:
        _pause(f"before:{(kwargs or {}).get('name') or task.name.rsplit('.', 1)[-1]}")


_get_node = SQLStore.get_node


def _get_node_then_pause(self: SQLStore, node_id: str) -> Any:
    """A step's entry check on a SQL store, then the flag "after_entry_read:<name>": a test
    cuts the store in the window between the check and the record of the step's start."""
    found = _get_node(self, node_id)
    task = current_task._get_current_object() if current_task else None  # a proxy
    if found is None and task is not None and task.request.id == node_id:
        _pause(f"after_entry_read:{task.name.rsplit('.', 1)[-1]}")
    return found


if "LAI_TEST_QUEUE" in os.environ:  # only in a fleet's processes, never in the test's own
    SQLStore.get_node = _get_node_then_pause  # type: ignore[method-assign]
if "LAI_TEST_GATHER_S" in os.environ:
    # Wider windows for the writer (writer.GATHER_S, OUTCOME_HOLD_S): a step's start (and
    # on Redis its outcome) then waits in its process's memory for as long as a test needs
    # to kill that process there.
    from livingai_tasks.engine import writer as _writer

    _writer.GATHER_S = _writer.OUTCOME_HOLD_S = float(os.environ["LAI_TEST_GATHER_S"])

lai.install(app)  # store and timings from LIVINGAI_* variables the test sets


@lai.agent_step(app)
def plan(goal: str) -> dict[str, Any]:
    count("plan")
    return {"goal": goal, "steps": ["search", "charge", "summarize"]}


@lai.tool_step(app, idempotent=True)
def search(plan: dict[str, Any]) -> dict[str, Any]:
    count("search")
    _pause("search")
    return {**plan, "hits": [f"{plan['goal']} result {i}" for i in range(3)]}


@lai.tool_step(app)
def charge_card(found: dict[str, Any]) -> dict[str, Any]:
    n = count("charge_card")
    count(f"charge_key:{lai.idempotency_key()}")
    _pause("charge_card")
    return {**found, "charge": {"amount": 42, "n": n, "key": lai.idempotency_key()}}


def _reconcile(key: str, found: dict[str, Any]) -> lai.Reconciled:
    """Ask 'the payment provider' (our counter keyed by the idempotency key) what happened."""
    global _redis
    if _redis is None:
        _redis = redis.Redis.from_url(REDIS_URL)
    if _redis.get(f"{COUNTERS}:charge_key:{key}"):
        return lai.Reconciled(done=True, output={**found, "charge": {"reconciled": True}})
    return lai.Reconciled(done=False)


@lai.tool_step(app, reconcile=_reconcile)
def charge_reconciled(found: dict[str, Any]) -> dict[str, Any]:
    count("charge_reconciled")
    count(f"charge_key:{lai.idempotency_key()}")
    _pause("charge_reconciled")
    return {**found, "charge": {"amount": 7}}


def _charge_after_pause(name: str, found: dict[str, Any]) -> dict[str, Any]:
    """Waits at the pause flag first, then makes the external call: a worker paused before
    the call makes it when it wakes (the zombie case)."""
    _pause(name)
    count(name)
    count(f"charge_key:{lai.idempotency_key()}")
    return {**found, "charge": {"key": lai.idempotency_key()}}


@lai.tool_step(app, reconcile=_reconcile)
def charge_late_reconciled(found: dict[str, Any]) -> dict[str, Any]:
    return _charge_after_pause("charge_late_reconciled", found)


@lai.tool_step(app)
def charge_late(found: dict[str, Any]) -> dict[str, Any]:
    return _charge_after_pause("charge_late", found)


@lai.agent_step(app, idempotent=False)
def send_email(result: dict[str, Any]) -> dict[str, Any]:
    """A side effect that is not typed TOOL: an agent step that must not run twice."""
    count("send_email")
    return {**result, "emailed": True}


@lai.agent_step(app)
def summarize(result: dict[str, Any]) -> str:
    count("summarize")
    _pause("summarize")
    return f"done: {result['goal']}"


@lai.agent_step(app)
def step(value: int, name: str = "step") -> int:
    """A generic idempotent step for chains of any length."""
    count(name)
    _pause(name)
    return value + 1


@lai.agent_step(app)
def long_step(value: int) -> int:
    """Checkpoints its progress; a re-run resumes from the last checkpoint."""
    state = lai.last_state() or {"i": 0, "resumed_from": None}
    if state["i"]:
        state["resumed_from"] = state["i"]
    while state["i"] < 5:
        state["i"] += 1
        count("long_step_iter")
        lai.checkpoint(state)
        _pause(f"long_step_{state['i']}")
    return value + state["i"] + 100 * (state["resumed_from"] or 0)


@lai.agent_step(app)
def fail(value: int) -> int:
    count("fail")
    raise ValueError(f"bad value {value}")


@lai.agent_step(app)
def fail_with_nul(value: int) -> int:
    count("fail_with_nul")
    raise ValueError("bad \x00 byte")  # a tool echoing binary: PostgreSQL refuses the NUL


@lai.agent_step(app, bind=True, max_retries=2, default_retry_delay=0)
def flaky(self: Any, value: int) -> int:
    n = count("flaky")
    if n < 2:
        raise self.retry(exc=RuntimeError("transient"), countdown=0)
    return value * 10


@lai.agent_step(app)
def typed_values(n: int) -> dict[str, Any]:
    """Values Celery's JSON carries as tagged objects, which the record must keep as such."""
    import datetime
    import decimal
    import uuid

    count("typed_values")
    return {"at": datetime.datetime(2026, 12, 3, 9, 30, n, tzinfo=datetime.timezone.utc),
            "day": datetime.date(2026, 12, 3), "id": uuid.UUID(int=n),
            "price": decimal.Decimal("19.90"), "raw": bytes([0, 255, n])}


@lai.agent_step(app)
def check_types(values: dict[str, Any]) -> list[str]:
    count("check_types")
    return sorted(f"{k}:{type(v).__name__}" for k, v in values.items())


@lai.agent_step(app)
def collect(values: list[int]) -> int:
    count("collect")
    return sum(values)


# -- durable waits (tests/test_waits_workers.py) ---------------------------------------------


@lai.tool_step(app, approval=True)
def charge_gated(found: dict[str, Any]) -> dict[str, Any]:
    """A payment that a person approves first: counted only when its body really runs."""
    count("charge_gated")
    return {**found, "charged": True, "key": lai.idempotency_key()}


@lai.tool_step(app, approval=lambda found: found.get("amount", 0) > 100, approvers=["alice"])
def charge_over_100(found: dict[str, Any]) -> dict[str, Any]:
    count("charge_over_100")
    return {**found, "charged": True}


@lai.tool_step(app, approval=True, approval_timeout=1.5)
def charge_gated_briefly(found: dict[str, Any]) -> dict[str, Any]:
    count("charge_gated_briefly")
    return {**found, "charged": True}


@app.task(name="tests.agent_app.on_error")
def on_error(request: Any, exc: Any, traceback: Any) -> None:
    """An errback (link_error): records which error the chain's error handling saw."""
    count(f"errback:{type(exc).__name__}")


@lai.agent_step(app)
def await_event(value: Any, name: str = "go", timeout: float | None = None) -> dict[str, Any]:
    """Waits for an event as its first act; counts each run of its body."""
    count("await_event_runs")
    try:
        payload = lai.wait_for(name, timeout=timeout)
    except lai.WaitTimeout:
        count("await_event_timeout")
        return {"value": value, "timed_out": True}
    count("await_event_received")
    return {"value": value, "payload": payload}


@lai.agent_step(app)
def nap(value: Any, seconds: float = 2.0) -> dict[str, Any]:
    """A durable sleep: its worker is free while it sleeps."""
    count("nap_runs")
    lai.sleep(seconds)
    count("nap_done")
    return {"value": value, "slept": seconds}


@lai.tool_step(app, start_after=2.5)
def charge_later(found: dict[str, Any]) -> dict[str, Any]:
    """A tool scheduled to run later: no worker is held until then."""
    count("charge_later")
    return {**found, "charged_at": time.time()}


def _pause_before_waiting_record() -> None:
    """Hold a step between its look at the mailbox and its WAITING record while the test
    holds the flag "record_waiting": the window in which a send finds no waiting step."""
    from livingai_tasks.celery_wing import waits

    original = waits.record_waiting

    def record_waiting(*args: Any, **kwargs: Any) -> Any:
        count("record_waiting_reached")
        _pause("record_waiting")
        return original(*args, **kwargs)

    waits.record_waiting = record_waiting  # type: ignore[assignment]


_pause_before_waiting_record()


# -- an agent loop with journaled calls (test_worker_journal.py) ---------------------------


def fake_model(run: str, topic: str, turn: int) -> dict[str, Any]:
    """A model that counts its calls (per run label and turn) and reports token usage."""
    count(f"{run}:model")
    count(f"{run}:model:{turn}")
    _pause(f"{run}:model:{turn}")
    return {"text": f"{topic}: thought {turn}", "model": "fake-1",
            "usage": {"input_tokens": 100 + turn, "output_tokens": 10 * (turn + 1)}}


def refund(run: str, topic: str, amount: int) -> dict[str, Any]:
    """A non-idempotent tool: each call is a real effect, counted."""
    count(f"{run}:refund")
    count(f"refund_key:{lai.idempotency_key()}")
    _pause(f"{run}:refund")
    return {"refunded": amount, "topic": topic}


@lai.agent_step(app)
def agent_loop(topic: str, run: str) -> dict[str, Any]:
    """Three model calls, a refund, two more model calls: all inside one step."""
    notes = [lai.call(fake_model, run, topic, turn, kind="model", model="fake-1")["text"]
             for turn in range(3)]
    receipt = lai.call(refund, run, topic, 42, name="refund")
    notes += [lai.call(fake_model, run, topic, turn, kind="model", model="fake-1")["text"]
              for turn in range(3, 5)]
    return {"notes": notes, "receipt": receipt}


@lai.agent_step(app)
def agent_waits(topic: str, run: str) -> dict[str, Any]:
    """Two model calls, a wait for an event (the step runs again from its start when it is
    woken), then one more model call."""
    notes = [lai.call(fake_model, run, topic, turn, kind="model")["text"] for turn in range(2)]
    answer = lai.wait_for("go")
    notes.append(lai.call(fake_model, run, topic, 2, kind="model")["text"])
    return {"notes": notes, "answer": answer}
