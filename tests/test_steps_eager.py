"""Handler logic in Celery's eager mode (no broker): what gets recorded, and the entry check.

Real workers and crashes are in test_worker_*.py; these cover the decisions quickly.
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery, chain

import livingai_tasks as lai
from livingai_tasks import ConfigError, ExecutionStatus, NodeType, Status
from livingai_tasks.celery_wing import runtime as lai_runtime

from .eager import eager_store, flush, store

app = Celery("eager_app")
# Not task_eager_propagates: with it Celery re-raises before its failure handling, so
# task_failure never fires in eager mode. EagerResult.get() still raises.
app.conf.update(task_always_eager=True, task_eager_propagates=False)
calls: dict[str, int] = {}


def _count(name: str) -> None:
    calls[name] = calls.get(name, 0) + 1


@lai.agent_step(app, name="eager.plan")
def plan(goal: str) -> dict[str, Any]:
    _count("plan")
    return {"goal": goal}


@lai.tool_step(app, name="eager.charge")
def charge(p: dict[str, Any]) -> dict[str, Any]:
    _count("charge")
    return {**p, "charged": lai.idempotency_key()}


@lai.agent_step(app, name="eager.summarize", type="MEMORY")
def summarize(p: dict[str, Any]) -> str:
    _count("summarize")
    return f"ok {p['goal']}"


@lai.agent_step(app, name="eager.boom")
def boom(x: int) -> int:
    raise ValueError(f"boom {x}")


@lai.agent_step(app, name="eager.not_json")
def not_json() -> Any:
    return {1, 2}


@lai.agent_step(app, name="eager.saver")
def saver(n: int) -> Any:
    before = lai.last_state()
    lai.checkpoint({"n": n, "history": ["msg"] * n})
    return {"before": before, "after": lai.last_state()}


@lai.agent_step(app, name="eager.two_saves")
def two_saves() -> Any:
    found = lai.last_state()
    if found is None:
        lai.checkpoint({"k": 1})
        lai.checkpoint({"k": 2})
        raise RuntimeError("crash after two checkpoints")
    return found


@lai.agent_step(app, name="eager.lease_probe")
def lease_probe() -> Any:
    """What the store itself (not this process's engine) says of the execution's lease while
    the body runs."""
    _count("lease_probe")
    execution = store().get_execution(lai.current_execution_id())
    return {"owner": execution.lease_owner, "deadline": execution.lease_deadline}


@pytest.fixture(autouse=True)
def installed(tmp_path: Any) -> Iterator[None]:
    calls.clear()
    with eager_store(app, tmp_path, "eager"):
        yield


def test_chain_records_nodes_in_seq_order_and_completes() -> None:
    run = lai.start(chain(plan.s("fly"), charge.s(), summarize.s()))
    assert run.get() == "ok fly"
    flush()
    nodes = store().nodes(run.execution_id)
    assert [n.metadata["task"] for n in nodes] == ["eager.plan", "eager.charge", "eager.summarize"]
    assert [n.seq for n in nodes] == [1, 2, 3]
    assert [n.type for n in nodes] == [NodeType.PROMPT, NodeType.TOOL, NodeType.MEMORY]
    assert all(n.status is Status.SUCCESS for n in nodes)
    assert nodes[1].parent_id == nodes[0].id and nodes[2].parent_id == nodes[1].id
    assert nodes[0].input == {"args": ["fly"], "kwargs": {}}
    assert nodes[0].output == {"goal": "fly"}
    assert nodes[1].is_idempotent() is False and nodes[0].is_idempotent() is True
    assert all(n.latency_ms is not None and n.completed_at for n in nodes)
    assert [v.status for v in store().node_versions(nodes[1].id)] == [Status.RUNNING,
                                                                        Status.SUCCESS]
    assert store().get_execution(run.execution_id).status is ExecutionStatus.COMPLETED


def test_failure_records_error_and_fails_the_execution() -> None:
    run = lai.start(boom.s(3))
    with pytest.raises(ValueError, match="boom 3"):
        run.get()
    flush()
    [execution] = store().list_executions()
    [node] = store().nodes(execution.id)
    assert node.status is Status.FAILED
    assert node.error.type == "ValueError" and node.error.message == "boom 3"
    assert "Traceback" in (node.error.traceback or "")
    assert execution.status is ExecutionStatus.FAILED and "boom 3" in execution.reason


def test_a_step_that_already_succeeded_returns_its_output_without_running() -> None:
    run = lai.start(plan.s("x"), task_id="fixed-task-id")
    flush()
    assert calls == {"plan": 1}
    again = plan.apply(("x",), task_id="fixed-task-id",
                       headers={"lai_execution_id": run.execution_id, "lai_seq": 1})
    assert again.get() == {"goal": "x"}
    assert calls == {"plan": 1}  # the body did not run again
    assert lai_runtime.get().engine.metrics.as_dict()["counters"]["steps_replayed"] == 1


def test_tool_started_but_unfinished_is_held_in_doubt_not_rerun() -> None:
    from livingai_tasks.nodes import ExecutionNode

    eid = "exec-doubt"
    store().create_execution(lai.Execution(id=eid))
    store().append([ExecutionNode(id="tool-1", execution_id=eid, type=NodeType.TOOL, seq=2,
                                  status=Status.CRASHED,
                                  metadata={"task": "eager.charge", "attempt": 1})])
    with pytest.raises(lai.StepInDoubtError, match="may or may not have happened"):
        charge.apply(({"goal": "g"},), task_id="tool-1",
                     headers={"lai_execution_id": eid, "lai_seq": 2}).get()
    assert calls == {}
    flush()
    assert store().get_node("tool-1").status is Status.IN_DOUBT
    assert store().get_execution(eid).status is ExecutionStatus.IN_DOUBT


def test_idempotency_key_is_stable_for_the_same_step() -> None:
    keys = set()
    for _ in range(2):
        from livingai_tasks.nodes import ExecutionNode

        store().append([ExecutionNode(id="t-k", execution_id="e-k", type=NodeType.TOOL, seq=1,
                                      status=Status.FAILED, metadata={"task": "eager.charge"})])
        out = charge.apply(({"goal": "g"},), task_id="t-k",
                           headers={"lai_execution_id": "e-k", "lai_seq": 1}).get()
        keys.add(out["charged"])
    assert len(keys) == 1 and keys.pop().startswith("lai-")


def test_checkpoint_and_last_state_inside_a_step() -> None:
    out = lai.start(saver.s(3)).get()
    assert out == {"before": None, "after": {"n": 3, "history": ["msg"] * 3}}


def test_an_output_nobody_can_carry_fails_the_step_never_a_repr() -> None:
    run = lai.start(not_json.s())
    with pytest.raises(lai.NotJSONSerializableError, match="Accepted: dict, list"):
        run.get()
    flush()
    [node] = store().nodes(run.execution_id)
    assert node.status is Status.FAILED and node.output is None
    assert node.error.type == "NotJSONSerializableError"
    assert store().get_execution(run.execution_id).status is ExecutionStatus.FAILED


def test_helpers_outside_a_step_say_where_they_work() -> None:
    with pytest.raises(ConfigError, match="inside a running @agent_step"):
        lai.checkpoint({"a": 1})
    with pytest.raises(ConfigError, match="inside a running"):
        lai.idempotency_key()
    assert lai.current_execution_id() is None


def test_bad_decorator_arguments_are_clear() -> None:
    with pytest.raises(ConfigError, match="Celery app"):
        lai.agent_step("not an app")
    with pytest.raises(ConfigError, match="accepted types"):
        lai.agent_step(app, type="LLM")
    with pytest.raises(ConfigError, match="idempotent"):
        lai.tool_step(app, idempotent="no")
    with pytest.raises(ConfigError, match="reconcile"):
        lai.tool_step(app, reconcile=42)
    with pytest.raises(ConfigError, match="json"):
        lai.agent_step(app, serializer="pickle")
    with pytest.raises(ConfigError, match="StepTask"):
        lai.agent_step(app, base=object)
    with pytest.raises(ConfigError, match="decorates a function"):
        lai.agent_step(app)(42)


def test_decorators_accept_ordinary_celery_options() -> None:
    @lai.agent_step(app, name="eager.opts", queue="agents", max_retries=7, rate_limit="10/s",
                    bind=True)
    def opts(self: Any, x: int) -> Any:
        return [x, self.request.id is not None]

    assert opts.name == "eager.opts" and opts.queue == "agents" and opts.max_retries == 7
    assert opts.acks_late is True and opts.reject_on_worker_lost is False
    assert lai.start(opts.s(5)).get() == [5, True]


def test_install_rejects_bad_settings_and_pickle(tmp_path: Any) -> None:
    with pytest.raises(ConfigError, match="budget_ms must be > 0"):
        lai.install(app, budget_ms=0)
    with pytest.raises(ConfigError, match="Unsupported store URL scheme 'mysql'"):
        lai.install(app, store="mysql://db/x")
    with pytest.raises(ConfigError, match="Unknown livingai_tasks setting"):
        lai.install(app, budget=5)
    with pytest.raises(ConfigError, match="heartbeat_s"):
        lai.install(app, lease_s=3, heartbeat_s=5)
    with pytest.raises(ConfigError, match=r"install\(max_attempts=\.\.\.\) must be a whole "
                                          "number, got 'three'"):
        lai.install(app, max_attempts="three")
    with pytest.raises(ConfigError, match="max_recoveries must be > 0, got 0"):
        lai.install(app, max_recoveries=0)
    with pytest.raises(ConfigError, match="Celery app"):
        lai.install(object())  # type: ignore[arg-type]
    other = Celery("pickly")
    other.conf.accept_content = ["json", "pickle"]
    with pytest.raises(ConfigError, match="must never be able to run code"):
        lai.install(other, store=f"sqlite:///{tmp_path}/p.db")


# Every number a deployment sets: a non-finite one fails at install(), whichever door it came
# through, with a message naming the setting (not later inside a worker).
NUMERIC_SETTINGS = [f.name for f in dataclasses.fields(lai.Settings) if f.type in ("int", "float")]


@pytest.mark.parametrize("door", ["keyword", "celery config", "environment"])
@pytest.mark.parametrize("name", NUMERIC_SETTINGS)
def test_install_refuses_a_non_finite_number_for_every_numeric_setting(
        name: str, door: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    assert len(NUMERIC_SETTINGS) >= 16  # the rule is not vacuous
    for value in (math.inf, -math.inf, math.nan):
        other = Celery(f"non-finite-{name}", set_as_current=False)
        keywords: dict[str, Any] = {}
        if door == "keyword":
            keywords[name] = value
        elif door == "celery config":
            other.conf[f"livingai_{name}"] = value
        else:
            monkeypatch.setenv(f"LIVINGAI_{name.upper()}", str(value))
        with pytest.raises(ConfigError) as info:
            lai.install(other, store=f"sqlite:///{tmp_path}/n.db", **keywords)
        message = str(info.value)
        named = f"LIVINGAI_{name.upper()}" if door == "environment" else name
        assert named in message and "must be" in message, message
        assert str(value) in message, message  # what was given, next to what is accepted


def test_settings_come_from_config_then_environment(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Any) -> None:
    other = Celery("configured")
    other.conf.livingai_budget_ms = 20
    monkeypatch.setenv("LIVINGAI_BUDGET_MS", "99")
    monkeypatch.setenv("LIVINGAI_LEASE_S", "40")
    settings = lai.install(other, store=f"sqlite:///{tmp_path}/c.db")
    assert settings.budget_ms == 20.0 and settings.lease_s == 40.0
    assert settings.heartbeat_s == pytest.approx(40 / 3)
    monkeypatch.setenv("LIVINGAI_UNENCODED_MAX_BYTES", str(2**30))
    assert lai.install(other, store=f"sqlite:///{tmp_path}/u.db").unencoded_max_bytes == 2**30
    assert lai_runtime.get().engine._unencoded_max_bytes == 2**30  # reaches the engine
    monkeypatch.setenv("LIVINGAI_UNENCODED_MAX_BYTES", "0")
    with pytest.raises(ConfigError, match="unencoded_max_bytes must be > 0, got 0"):
        lai.install(other)
    monkeypatch.delenv("LIVINGAI_UNENCODED_MAX_BYTES")
    monkeypatch.setenv("LIVINGAI_LEASE_S", "soon")
    with pytest.raises(ConfigError, match="LIVINGAI_LEASE_S must be a number, got 'soon'"):
        lai.install(other)
    assert other.conf.beat_schedule["livingai-tasks-recover"]["task"] == "livingai_tasks.recover"
    assert other.conf.worker_prefetch_multiplier == 1
    # Monitoring is the deployment's choice: Celery's default (off) stays, a choice stays.
    assert other.conf.worker_send_task_events is False
    monkeypatch.delenv("LIVINGAI_LEASE_S")
    watched = Celery("watched")
    watched.conf.worker_send_task_events = True
    lai.install(watched, store=f"sqlite:///{tmp_path}/w.db")
    assert watched.conf.worker_send_task_events is True


def test_errors_pickle_round_trip() -> None:
    for cls in (lai.ConfigError, lai.CodecError, lai.StepInDoubtError, lai.NotDurableError,
                lai.StoreUnavailableError, lai.ResolveError, lai.StateTooLargeError):
        err = pickle.loads(pickle.dumps(cls("what was wrong")))
        assert type(err) is cls and str(err) == "what was wrong"


def test_celery_cancelling_a_running_tool_is_a_crash_not_a_retry() -> None:
    """worker_cancel_long_running_tasks_on_connection_loss: Celery kills the body and fires
    task_retry from the worker's main process. The redelivered copy must not charge again."""
    from celery import signals
    from celery.app.task import Context
    from celery.exceptions import Retry

    from livingai_tasks.nodes import ExecutionNode

    eid = "exec-cancel"
    store().create_execution(lai.Execution(id=eid))
    store().append([ExecutionNode(id="tool-c", execution_id=eid, type=NodeType.TOOL, seq=1,
                                  status=Status.RUNNING,
                                  metadata={"task": "eager.charge", "attempt": 1})])
    signals.task_retry.send(sender=charge, request=Context(id="tool-c"),
                            reason=Retry(message="cancelled by Celery"), einfo=None)
    assert store().get_node("tool-c").status is Status.CRASHED
    with pytest.raises(lai.StepInDoubtError):
        charge.apply(({"goal": "g"},), task_id="tool-c",
                     headers={"lai_execution_id": eid, "lai_seq": 1}).get()
    assert calls == {}  # never charged a second time


class _OwnStore:
    """A store of one's own, with a scheme open_store() does not know, as a user would
    plug one in: it need not inherit anything, only implement the Store protocol."""

    url = "ownstore://inventory"

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.closed = False

    def close(self) -> None:
        self.closed = True
        self._inner.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_install_takes_a_store_instance_of_ones_own(tmp_path: Any) -> None:
    inner = lai.open_store(f"sqlite:///{tmp_path}/own.db")
    inner.migrate()
    own = _OwnStore(inner)
    assert isinstance(own, lai.Store)
    settings = lai.install(app, store=own)
    assert settings.store == "ownstore://inventory"
    run = lai.start(chain(plan.s("own"), summarize.s()))
    assert run.get() == "ok own"
    flush()
    assert lai_runtime.get().engine.store is own
    assert [n.metadata["task"] for n in inner.nodes(run.execution_id)] == ["eager.plan",
                                                                           "eager.summarize"]
    lai_runtime.get().close()
    assert not own.closed  # its owner closes it
    own.close()


def test_install_refuses_what_is_neither_a_url_nor_a_store() -> None:
    with pytest.raises(ConfigError, match="store URL or a livingai_tasks.Store instance"):
        lai.install(app, store=42)  # type: ignore[arg-type]


def test_last_state_skips_a_corrupt_newest_checkpoint_for_the_one_before(
        tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    import sqlite3

    run = lai.start(two_saves.s())
    with pytest.raises(RuntimeError):
        run.get()
    flush()
    [node] = store().nodes(run.execution_id)
    db = sqlite3.connect(f"{tmp_path}/eager.db")
    (newest_id, blob), = db.execute(
        "SELECT id, checkpoint FROM lai_node_versions WHERE node_id = ? AND checkpoint IS NOT "
        "NULL ORDER BY id DESC LIMIT 1", (node.id,)).fetchall()
    db.execute("UPDATE lai_node_versions SET checkpoint = ? WHERE id = ?",
               (bytes(blob[:-3]) + bytes([blob[-3] ^ 0xFF]) + bytes(blob[-2:]), newest_id))
    db.commit()
    db.close()
    lai_runtime.get().close()  # a fresh process's view: nothing cached
    lai.install(app, store=f"sqlite:///{tmp_path}/eager.db", lease_s=30)
    again = two_saves.apply(task_id=node.id, headers={"lai_execution_id": run.execution_id,
                                                      "lai_seq": 1})
    assert again.get() == {"k": 1}
    assert "is corrupt" in caplog.text and "trying the one before it" in caplog.text


def test_last_state_on_redis_reads_past_a_damaged_latest_checkpoint_copy(
        redis_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Redis keeps a copy of the latest checkpoint beside the node's versions: damaged (a
    byte flipped in the real key), it is reported and the versions are read instead."""
    import redis

    from .conftest import REDIS_URL

    url = f"{REDIS_URL}?prefix={redis_prefix}"
    lai_runtime.get().close()
    lai.install(app, store=url, lease_s=30)
    run = lai.start(two_saves.s())
    with pytest.raises(RuntimeError):
        run.get()
    flush()
    [node] = store().nodes(run.execution_id)
    key = store().keys.checkpoint(run.execution_id)
    client = redis.Redis.from_url(REDIS_URL)
    raw = client.get(key)
    client.set(key, raw[:-3] + bytes([raw[-3] ^ 0xFF]) + raw[-2:])
    client.close()
    lai_runtime.get().close()  # a fresh process's view: nothing cached
    lai.install(app, store=url, lease_s=30)
    again = two_saves.apply(task_id=node.id, headers={"lai_execution_id": run.execution_id,
                                                      "lai_seq": 1})
    assert again.get() == {"k": 2}  # the versions themselves are intact
    assert "is corrupt" in caplog.text and key in caplog.text


def _waiting(eid: str, node_id: str, task: str) -> None:
    """An execution suspended in a wait whose lease ran out: its woken message waited in a
    backlog longer than lease_s."""
    from livingai_tasks.nodes import ExecutionNode

    store().create_execution(lai.Execution(id=eid, status=ExecutionStatus.WAITING,
                                           lease_deadline=time.time() - 1))
    store().append([ExecutionNode(id=node_id, execution_id=eid, type=NodeType.PROMPT, seq=1,
                                  status=Status.WAITING,
                                  metadata={"task": task, "attempt": 1, "fence": 0})])


def test_a_woken_step_stands_down_if_recovery_claimed_its_execution_after_it_was_sent() -> None:
    # Recovery claimed the execution (fence 0 -> 1) and has not yet republished: the copy
    # already sent under fence 0 passes the entry check (the node still says fence 0), but
    # its lease is a compare-and-set on the fence, so it does not run the body beside
    # recovery's copy (a woken wait delivered twice).
    _waiting("exec-claimed", "plan-claimed", "eager.plan")
    assert store().claim("exec-claimed", fence=0, owner="recovery", lease_s=30)
    plan.apply(("x",), task_id="plan-claimed",
               headers={"lai_execution_id": "exec-claimed", "lai_seq": 1})
    assert calls == {}
    assert store().get_execution("exec-claimed").lease_owner == "recovery"


def test_a_woken_step_holds_a_live_lease_in_the_store_before_its_body_runs() -> None:
    _waiting("exec-woken", "probe-woken", "eager.lease_probe")
    seen = lease_probe.apply(task_id="probe-woken",
                             headers={"lai_execution_id": "exec-woken", "lai_seq": 1}).get()
    assert calls == {"lease_probe": 1}
    assert seen["owner"] == lai_runtime.get().owner and seen["deadline"] > time.time()
