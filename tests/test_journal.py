"""Journaled calls inside a step: the pure decisions (journal.py) and the wing's recording
and replay, in Celery's eager mode on a real SQLite store. Crashes of real workers are in
test_worker_journal.py."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

import livingai_tasks as lai
from livingai_tasks import ConfigError, ExecutionStatus, NodeType, Status
from livingai_tasks.celery_wing import runtime as lai_runtime
from livingai_tasks.celery_wing.journal_resolve import resolve
from livingai_tasks.journal import (
    CallDecision,
    CallSpec,
    call_node_id,
    decide_call,
    is_call,
    running_call,
    token_totals,
    usage_of,
)
from livingai_tasks.nodes import ExecutionNode, Meta

from .eager import crashed_step, deliver_again, eager_store, flush, store

# -- pure: ordering, mismatch, replay decisions ----------------------------------------------

STEP = ExecutionNode(id="step-1", execution_id="e1", type=NodeType.PROMPT, seq=2,
                     status=Status.RUNNING, metadata={Meta.TASK: "t"})


def _recorded(index: int, name: str, status: Status, *, idempotent: bool = False,
              **meta: Any) -> ExecutionNode:
    spec = CallSpec(name, "tool", idempotent)
    node = running_call(STEP, index, spec, fence=0, owner="h:1", worker="h:0", input=None,
                        previous=None)
    return node.evolve(status=status, output={"r": index},
                       metadata={**node.metadata, **meta})


def test_a_call_node_is_keyed_by_its_step_and_order_and_linked_to_the_step() -> None:
    node = running_call(STEP, 3, CallSpec("f", "model", True, "m1"), fence=4, owner="h:1",
                        worker="h:0", input={"args": [], "kwargs": {}}, previous=None)
    assert node.id == call_node_id("step-1", 3) != call_node_id("step-1", 4)
    assert call_node_id("step-1", 3) != call_node_id("step-2", 3)
    assert node.parent_id == "step-1" and node.execution_id == "e1" and node.seq == 2
    assert node.type is NodeType.PROMPT and is_call(node) and not is_call(STEP)
    assert node.metadata[Meta.FENCE] == 4 and node.metadata[Meta.MODEL] == "m1"
    assert node.metadata[Meta.ATTEMPT] == 1 and node.is_idempotent()
    again = running_call(STEP, 3, CallSpec("f", "model", True), fence=5, owner="h:2",
                         worker="h:0", input=None, previous=node)
    assert again.metadata[Meta.ATTEMPT] == 2 and again.created_at == node.created_at


@pytest.mark.parametrize("recorded, reconcilable, expected", [
    (None, False, CallDecision.RUN),
    (_recorded(0, "f", Status.SUCCESS), False, CallDecision.REPLAY),
    (_recorded(0, "f", Status.FAILED), False, CallDecision.RUN),
    (_recorded(0, "f", Status.RUNNING), False, CallDecision.IN_DOUBT),
    (_recorded(0, "f", Status.RUNNING), True, CallDecision.RECONCILE),
    (_recorded(0, "f", Status.RUNNING, idempotent=True), False, CallDecision.RUN),
    (_recorded(0, "f", Status.IN_DOUBT), False, CallDecision.IN_DOUBT),
    (_recorded(0, "f", Status.IN_DOUBT, resolution="retry"), False, CallDecision.RUN),
    (_recorded(0, "g", Status.SUCCESS), False, CallDecision.MISMATCH),
    (_recorded(1, "f", Status.SUCCESS), False, CallDecision.MISMATCH),
])
def test_what_a_call_does_given_its_record(recorded: ExecutionNode | None, reconcilable: bool,
                                           expected: CallDecision) -> None:
    assert decide_call(recorded, name="f", index=0, reconcilable=reconcilable)[0] is expected


def test_a_mismatch_names_both_calls() -> None:
    _, why = decide_call(_recorded(0, "search", Status.SUCCESS), name="charge", index=0,
                         reconcilable=False)
    assert "'charge'" in why and "'search'" in why and "another order" in why


def test_recovery_plans_the_step_and_leaves_its_calls_to_the_step_rerun() -> None:
    from livingai_tasks import Action, Execution, RecoveryEngine, open_store

    memory = open_store("memory://")
    memory.create_execution(Execution(id="e1", lease_deadline=0.0))
    step = STEP.evolve(metadata={Meta.TASK: "t", Meta.ATTEMPT: 1, Meta.REQUEST: {"task": "t"}})
    memory.append([step, _recorded(0, "refund", Status.RUNNING)])  # a tool call in flight
    plan = RecoveryEngine(memory).plan("e1", now=10.0)
    assert plan.action is Action.RESUME and [n.id for n in plan.resume_nodes] == ["step-1"]


def test_usage_is_read_under_every_provider_name_and_refused_when_unreadable() -> None:
    assert usage_of({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
                    what="x") == {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7}

    class Usage:
        input_tokens, output_tokens = 5, 6

    assert usage_of(Usage(), what="x") == {"input_tokens": 5, "output_tokens": 6,
                                           "total_tokens": 11}
    assert usage_of(None, what="x") is None
    with pytest.raises(ConfigError, match="no token counts"):
        usage_of({"tokens": 3}, what="x")
    with pytest.raises(ConfigError, match="int >= 0"):
        usage_of({"input_tokens": "3"}, what="x")


def test_call_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="accepted kinds"):
        CallSpec.of(len, kind="llm")
    with pytest.raises(ConfigError, match="True or False"):
        CallSpec.of(len, idempotent="yes")  # type: ignore[arg-type]
    async def fetch() -> None: ...

    with pytest.raises(ConfigError, match="coroutine function"):
        CallSpec.of(fetch)
    assert CallSpec.of(len, kind="model").idempotent is True
    assert CallSpec.of(len).idempotent is False and CallSpec.of(len).name == "builtins.len"


# -- eager steps on a real SQLite store ---------------------------------------------------

app = Celery("journal_eager")
app.conf.update(task_always_eager=True, task_eager_propagates=False)
seen: dict[str, int] = {}
plan_for: dict[str, Any] = {}


class Crash(BaseException):
    """Stands for the process dying: nothing of the step runs after it, nothing records."""


def _tick(name: str) -> int:
    seen[name] = seen.get(name, 0) + 1
    return seen[name]


def fake_model(prompt: str, turn: int) -> dict[str, Any]:
    _tick(f"model:{turn}")
    if plan_for.get("crash_in") == f"model:{turn}":
        raise Crash()
    return {"text": f"{prompt}-{turn}", "model": "fake-1",
            "usage": {"input_tokens": 10, "output_tokens": turn, "total_tokens": 10 + turn}}


@lai.journaled(name="refund")
def refund(order: str) -> dict[str, Any]:
    _tick("refund")
    if lai.current_execution_id() is not None:
        seen["refund_key"] = lai.idempotency_key()  # type: ignore[assignment]
    if plan_for.get("crash_in") == "refund":
        raise Crash()
    return {"refunded": order}


@lai.agent_step(app, name="journal.agent")
def agent(prompt: str) -> dict[str, Any]:
    notes = [lai.call(fake_model, prompt, t, kind="model")["text"] for t in range(2)]
    receipt = refund(prompt)
    if plan_for.get("crash_after") == "refund":
        raise Crash()
    notes.append(lai.call(fake_model, prompt, 2, kind="model")["text"])
    return {"notes": notes, "receipt": receipt}


def _asked_provider(key: str, order: str) -> lai.Reconciled:
    """'The provider' knows the key of every refund that went through."""
    if seen.get(f"done:{key}"):
        return lai.Reconciled(done=True, output={"refunded": order, "reconciled": True})
    return lai.Reconciled(done=False)


@lai.journaled(name="refund_rec", reconcile=_asked_provider)
def refund_rec(order: str) -> dict[str, Any]:
    _tick("refund_rec")
    seen[f"done:{lai.idempotency_key()}"] = 1
    if plan_for.get("crash_in") == "refund_rec":
        raise Crash()
    return {"refunded": order}


@lai.agent_step(app, name="journal.reconciled")
def reconciled_agent(order: str) -> Any:
    return [lai.call(fake_model, order, 0, kind="model")["text"], refund_rec(order)]


@lai.agent_step(app, name="journal.overtaken")
def overtaken(order: str) -> Any:
    def taken_over() -> str:
        # Recovery claims the execution while this attempt runs (its worker was paused
        # past its lease, say): the fence moves on.
        eid = lai.current_execution_id()
        flush()  # the step's start landed before the takeover
        assert store().claim(eid, fence=0, owner="recovery", lease_s=30,
                             now=time.time() + 1000)
        return "ok"

    lai.call(taken_over, idempotent=True)
    return refund(order)


@lai.journaled(idempotent=True)
def research(topic: str) -> list[str]:
    """A journaled call that makes calls of its own: only its result is recorded."""
    return [lai.call(fake_model, topic, t, kind="model")["text"] for t in range(2)]


@lai.agent_step(app, name="journal.nested")
def nested(topic: str) -> Any:
    found = research(topic)
    if plan_for.get("crash_after") == "research":
        raise Crash()
    return [found, lai.call(fake_model, topic, 5, kind="model")["text"]]


@lai.agent_step(app, name="journal.changed")
def changed(prompt: str) -> Any:
    first = plan_for.get("first", "a")
    return [lai.call(str.upper, prompt, name=first, idempotent=True),
            lai.call(str.lower, prompt, name="b", idempotent=True)]


@lai.agent_step(app, name="journal.not_json")
def not_json_call() -> Any:
    return lai.call(lambda: {1, 2}, name="set_maker", idempotent=True)


@pytest.fixture(autouse=True)
def installed(tmp_path: Any) -> Iterator[None]:
    seen.clear()
    plan_for.clear()
    with eager_store(app, tmp_path, "journal"):
        yield


_again = deliver_again


def _crashed_run(prompt: str, where: dict[str, str]) -> ExecutionNode:
    plan_for.update(where)
    try:
        return crashed_step(lambda: lai.start(agent.s(prompt)), Crash)  # type: ignore[no-any-return]
    finally:
        plan_for.clear()


def test_outside_a_step_call_just_calls() -> None:
    assert lai.call(fake_model, "p", 0, kind="model")["text"] == "p-0"
    assert refund("o") == {"refunded": "o"}
    assert store().list_executions() == []


def test_calls_are_child_nodes_of_the_step_with_usage_and_tokens() -> None:
    out = lai.start(agent.s("p")).get()
    assert out == {"notes": ["p-0", "p-1", "p-2"], "receipt": {"refunded": "p"}}
    flush()
    [execution] = store().list_executions()
    nodes = store().nodes(execution.id)
    step, *calls = nodes
    assert not is_call(step) and [c.metadata[Meta.CALL_INDEX] for c in calls] == [0, 1, 2, 3]
    assert all(c.parent_id == step.id and c.status is Status.SUCCESS for c in calls)
    assert [c.type for c in calls] == [NodeType.PROMPT] * 2 + [NodeType.TOOL, NodeType.PROMPT]
    assert calls[0].metadata[Meta.MODEL] == "fake-1" and calls[1].cost_tokens == 11
    assert calls[2].metadata[Meta.CALL_NAME] == "refund" and not calls[2].is_idempotent()
    # a non-idempotent call's start is on record before its result
    assert [v.status for v in store().node_versions(calls[2].id)] == [Status.RUNNING,
                                                                       Status.SUCCESS]
    assert [v.status for v in store().node_versions(calls[0].id)] == [Status.SUCCESS]
    assert calls[2].output == {"refunded": "p"}
    assert seen["refund_key"] == lai.celery_wing.context.idempotency_key_of(  # type: ignore
        execution.id, calls[2].id)
    totals = token_totals(nodes)
    assert (totals["calls"], totals["total_tokens"]) == (3, 33)
    assert store().get_execution(execution.id).status is ExecutionStatus.COMPLETED


def test_a_rerun_replays_recorded_calls_and_runs_the_first_unrecorded_one_live() -> None:
    step = _crashed_run("p", {"crash_after": "refund"})
    assert seen == {"model:0": 1, "model:1": 1, "refund": 1, "refund_key": seen["refund_key"]}
    out = _again(agent, step, "p").get()
    assert out == {"notes": ["p-0", "p-1", "p-2"], "receipt": {"refunded": "p"}}
    assert (seen["model:0"], seen["model:1"], seen["refund"], seen["model:2"]) == (1, 1, 1, 1)
    counters = lai_runtime.get().engine.metrics.as_dict()["counters"]
    assert (counters["calls_replayed"], counters["calls_live"]) == (3, 4)
    flush()
    assert token_totals(store().nodes(step.execution_id))["total_tokens"] == 33


def test_a_call_made_in_another_order_fails_the_step_naming_both() -> None:
    plan_for["first"] = "a"
    lai.start(changed.s("Xy")).get()
    flush()
    [execution] = store().list_executions()
    step = store().nodes(execution.id)[0]
    store().append([step.evolve(status=Status.CRASHED)])  # its worker died after the calls
    plan_for["first"] = "z"
    with pytest.raises(lai.CallOrderError, match="'z'.*'a'"):
        _again(changed, step, "Xy").get()
    flush()
    assert store().get_node(step.id).status is Status.FAILED
    assert store().get_execution(execution.id).status is ExecutionStatus.FAILED


def test_a_result_json_cannot_carry_fails_the_call_before_it_is_recorded_done() -> None:
    run = lai.start(not_json_call.s())
    with pytest.raises(lai.NotJSONSerializableError, match="set_maker"):
        run.get()
    flush()
    [call] = [n for n in store().nodes(run.execution_id) if is_call(n)]
    assert call.status is Status.FAILED and call.error.type == "NotJSONSerializableError"


def test_killed_inside_a_non_idempotent_call_holds_the_step_then_resolve_retry() -> None:
    step = _crashed_run("p", {"crash_in": "refund"})
    refund_id = call_node_id(step.id, 2)
    assert store().get_node(refund_id).status is Status.RUNNING  # durable before it ran
    with pytest.raises(lai.StepInDoubtError, match="may or may not have happened"):
        _again(agent, step, "p").get()
    flush()
    assert seen["refund"] == 1 and seen["model:0"] == 1  # replayed, and not re-run
    assert store().get_node(refund_id).status is Status.IN_DOUBT
    assert store().get_node(step.id).status is Status.IN_DOUBT
    execution = store().get_execution(step.execution_id)
    assert execution.status is ExecutionStatus.IN_DOUBT and refund_id in execution.reason
    from livingai_tasks.cli.render import render_tree

    tree = "\n".join(render_tree(store().nodes(step.execution_id)))
    assert "held by its journaled call below" in tree
    assert f"livingai-tasks resolve {step.execution_id} {refund_id} --done" in tree
    published: list[dict[str, Any]] = []
    app.send_task = lambda *a, **kw: published.append(kw)  # type: ignore[method-assign]
    try:
        resolve(app, store(), step.execution_id, refund_id, retry=True, force=True)
    finally:
        del app.send_task
    assert published[0]["task_id"] == step.id  # the step is published again, not the call
    out = _again(agent, store().get_node(step.id), "p").get()
    assert out["receipt"] == {"refunded": "p"} and seen["refund"] == 2
    assert seen["model:0"] == 1 and seen["model:2"] == 1


def test_resolve_done_gives_the_held_call_the_operators_result() -> None:
    step = _crashed_run("p", {"crash_in": "refund"})
    with pytest.raises(lai.StepInDoubtError):
        _again(agent, step, "p").get()
    flush()
    app.send_task = lambda *a, **kw: None  # type: ignore[method-assign]
    try:
        resolve(app, store(), step.execution_id, call_node_id(step.id, 2), done=True,
                output={"refunded": "by hand"})
        with pytest.raises(lai.ResolveError, match="only IN_DOUBT"):
            resolve(app, store(), step.execution_id, call_node_id(step.id, 0), done=True)
    finally:
        del app.send_task
    out = _again(agent, store().get_node(step.id), "p").get()
    assert out["receipt"] == {"refunded": "by hand"} and seen["refund"] == 1
    flush()
    assert store().get_execution(step.execution_id).status is ExecutionStatus.COMPLETED


def test_a_call_with_reconcile_asks_instead_of_holding_the_step() -> None:
    plan_for["crash_in"] = "refund_rec"
    with pytest.raises(Crash):
        lai.start(reconciled_agent.s("o"))
    plan_for.clear()
    flush()
    [execution] = store().list_executions()
    step = [n for n in store().nodes(execution.id) if not is_call(n)][0]
    out = _again(reconciled_agent, step, "o").get()
    assert out == ["o-0", {"refunded": "o", "reconciled": True}]
    assert seen["refund_rec"] == 1 and seen["model:0"] == 1  # asked, not called again
    flush()
    call = store().get_node(call_node_id(step.id, 1))
    assert call.status is Status.SUCCESS and call.metadata["reconciled"] is True


def test_a_worker_that_lost_its_execution_never_makes_a_non_idempotent_call() -> None:
    run = lai.start(overtaken.s("o"))
    with pytest.raises(lai.FencedOutError):
        run.get()
    assert "refund" not in seen  # its start was refused (stale fence): never called
    flush()
    [step] = [n for n in store().nodes(run.execution_id) if not is_call(n)]
    assert store().get_node(call_node_id(step.id, 1)) is None
    assert store().get_execution(run.execution_id).status is ExecutionStatus.RUNNING


def test_calls_nested_in_a_journaled_call_are_part_of_it() -> None:
    plan_for["crash_after"] = "research"
    with pytest.raises(Crash):
        lai.start(nested.s("t"))
    plan_for.clear()
    flush()
    [execution] = store().list_executions()
    step, *calls = store().nodes(execution.id)
    assert [c.metadata[Meta.CALL_NAME] for c in calls] == ["tests.test_journal.research"]
    out = _again(nested, step, "t").get()
    assert out == [["t-0", "t-1"], "t-5"] and (seen["model:0"], seen["model:5"]) == (1, 1)


def test_show_nests_calls_under_their_step_with_tokens() -> None:
    from livingai_tasks.cli.render import render_tree, tokens_line

    lai.start(agent.s("p")).get()
    flush()
    [execution] = store().list_executions()
    nodes = store().nodes(execution.id)
    lines = render_tree(nodes)
    assert lines[0].startswith("└─ #1 PROMPT journal.agent  SUCCESS")
    assert "#1.0 PROMPT tests.test_journal.fake_model (fake-1)  SUCCESS" in lines[1]
    assert "tokens 10" in lines[1] and "#1.2 TOOL   refund  SUCCESS" in lines[3]
    assert tokens_line(nodes) == ("  tokens: 33 (input 30, output 3) in 3 recorded call(s): "
                                  "fake-1 33")
