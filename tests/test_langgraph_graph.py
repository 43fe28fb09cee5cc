"""A LangGraph graph inside a step, each node a journaled call: in Celery's eager mode on a
real SQLite store (crashes of real workers are in test_langgraph_workers.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("langgraph")

from celery import Celery  # noqa: E402

import livingai_tasks as lai  # noqa: E402
from livingai_tasks import ConfigError, ExecutionStatus, NodeType, Status  # noqa: E402
from livingai_tasks.adapters.langgraph import run_graph  # noqa: E402
from livingai_tasks.celery_wing import runtime as lai_runtime  # noqa: E402
from livingai_tasks.journal import is_call, token_totals  # noqa: E402
from livingai_tasks.nodes import ExecutionNode, Meta  # noqa: E402

from .eager import deliver_again, eager_store, store  # noqa: E402
from .langgraph_agent import MODEL, as_json, build, start_state, usage  # noqa: E402

app = Celery("langgraph_eager")
app.conf.update(task_always_eager=True, task_eager_propagates=False)
seen: dict[str, int] = {}
crash_at: set[str] = set()
threads: set[str] = set()


class Crash(BaseException):
    """Stands for the process dying: nothing of the step runs after it, nothing records."""


def _tick(name: str) -> None:
    seen[name] = seen.get(name, 0) + 1
    if name in crash_at:
        raise Crash()


def on_model(run: str, turn: int) -> None:
    _tick(f"model:{turn}")


def on_refund(run: str, amount: int) -> dict[str, Any]:
    _tick("refund")
    return {"refunded": amount, "key": lai.idempotency_key()}


GRAPH = build(on_model, on_refund)
ASKING = build(on_model, on_refund, ask_first=True)


@lai.agent_step(app, name="lg.agent")
def agent(topic: str) -> dict[str, Any]:
    return as_json(run_graph(GRAPH, start_state(topic, "eager")))


@lai.agent_step(app, name="lg.asking")
def asking(topic: str) -> dict[str, Any]:
    return as_json(run_graph(ASKING, start_state(topic, "eager")))


@pytest.fixture(autouse=True)
def installed(tmp_path: Any) -> Iterator[None]:
    seen.clear()
    crash_at.clear()
    with eager_store(app, tmp_path, "lg"):
        yield


def _step_and_calls(eid: str) -> tuple[ExecutionNode, list[ExecutionNode]]:
    assert lai_runtime.get().flush(10)
    nodes = store().nodes(eid)
    [step] = [n for n in nodes if not is_call(n)]
    return step, [n for n in nodes if is_call(n)]


_again = deliver_again


EXPECTED = {"run": "eager", "messages": [
    ["human", "refund me"], ["ai", ""], ["tool", ""], ["ai", "I refunded 42."],
    ["ai", "Summary: the customer got 42 back."]]}


def _expected(out: dict[str, Any]) -> None:
    tool = out["messages"][2]
    assert '"refunded": 42' in tool[1]
    assert {**out, "messages": [*out["messages"][:2], ["tool", ""], *out["messages"][3:]]} \
        == EXPECTED


def test_each_node_is_a_journaled_call_with_its_kind_and_tokens() -> None:
    run = lai.start(agent.s("refund me"))
    _expected(run.get())
    step, calls = _step_and_calls(run.execution_id)
    assert [c.metadata[Meta.CALL_NAME] for c in calls] == [
        "langgraph:agent", "langgraph:tools", "langgraph:agent", "langgraph:summarize"]
    assert [c.type for c in calls] == [NodeType.PROMPT, NodeType.TOOL, NodeType.PROMPT,
                                       NodeType.PROMPT]
    assert [c.is_idempotent() for c in calls] == [True, False, True, True]
    assert all(c.status is Status.SUCCESS for c in calls)
    assert calls[0].metadata[Meta.MODEL] == MODEL
    assert calls[0].metadata[Meta.USAGE] == usage(0)
    totals = token_totals(store().nodes(run.execution_id))
    assert totals["calls"] == 3
    assert totals["total_tokens"] == sum(usage(t)["total_tokens"] for t in range(3))
    assert seen == {"model:0": 1, "refund": 1, "model:1": 1, "model:2": 1}


def test_a_rerun_after_a_crash_replays_finished_nodes_and_never_refunds_twice() -> None:
    crash_at.add("model:1")  # the model call after the refund's effect
    with pytest.raises(Crash):
        lai.start(agent.s("refund me"))
    crash_at.clear()
    [execution] = store().list_executions()
    step, calls = _step_and_calls(execution.id)
    assert [c.status for c in calls] == [Status.SUCCESS, Status.SUCCESS, Status.RUNNING] or \
        [c.status for c in calls] == [Status.SUCCESS, Status.SUCCESS]
    out = _again(agent, step, "refund me").get()
    _expected(out)
    assert seen == {"model:0": 1, "refund": 1, "model:1": 2, "model:2": 1}
    assert _step_and_calls(execution.id)[0].status is Status.SUCCESS  # flushed first
    assert token_totals(store().nodes(execution.id))["calls"] == 3


def test_a_crash_inside_the_non_idempotent_node_holds_the_step_in_doubt() -> None:
    crash_at.add("refund")
    with pytest.raises(Crash):
        lai.start(agent.s("refund me"))
    crash_at.clear()
    [execution] = store().list_executions()
    step, _ = _step_and_calls(execution.id)
    with pytest.raises(lai.StepInDoubtError, match="may or may not have happened"):
        _again(agent, step, "refund me").get()
    assert seen["refund"] == 1 and seen["model:0"] == 1  # never twice; replayed
    step, calls = _step_and_calls(execution.id)
    assert step.status is Status.IN_DOUBT and calls[1].status is Status.IN_DOUBT
    assert store().get_execution(execution.id).status is ExecutionStatus.IN_DOUBT


def test_bad_node_metadata_is_refused_with_what_is_accepted() -> None:
    from langgraph.graph import StateGraph

    from livingai_tasks.adapters.langgraph import durable_graph

    from .langgraph_agent import AgentState

    builder = StateGraph(AgentState)
    builder.add_node("x", lambda s: {}, metadata={"kind": "robot"})
    with pytest.raises(ConfigError, match="'model', 'tool', 'memory'"):
        durable_graph(builder)


@lai.agent_step(app, name="lg.fan_out")
def fan_out() -> str:
    from langgraph.graph import END, START, StateGraph

    from livingai_tasks.adapters.langgraph import durable_graph

    from .langgraph_agent import AgentState

    def branch(name: str) -> Any:
        def run(state: AgentState) -> dict[str, Any]:
            _tick(name)
            threads.add(threading.current_thread().name)
            return {}
        return run

    builder = StateGraph(AgentState)
    for name in ("left", "right", "join"):
        builder.add_node(name, branch(name), metadata={"idempotent": True})
    builder.add_edge(START, "left")
    builder.add_edge(START, "right")  # two branches in one super-step
    builder.add_edge(["left", "right"], "join")
    builder.add_edge("join", END)
    threads.add(threading.current_thread().name)
    run_graph(durable_graph(builder), start_state("fan", "eager"))
    return "ok"


def test_parallel_branches_are_journaled_one_at_a_time_in_langgraph_order() -> None:
    threads.clear()
    run = lai.start(fan_out.s())
    assert run.get() == "ok"
    assert len(threads) > 1  # LangGraph ran the branches in its worker thread
    _, calls = _step_and_calls(run.execution_id)
    # each is still a call of the step, in LangGraph's task order
    assert [c.metadata[Meta.CALL_NAME] for c in calls] == [
        "langgraph:left", "langgraph:right", "langgraph:join"]
    assert seen == {"left": 1, "right": 1, "join": 1}
