"""The Pydantic AI adapter in Celery's eager mode on a real SQLite store: model requests and
tool calls recorded as journaled calls with their usage, a re-run after a crash replaying
them, a non-idempotent tool killed mid-call holding the step IN_DOUBT. Real workers killed
with SIGKILL: test_pydantic_ai_workers.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery

pytest.importorskip("pydantic_ai")

from pydantic_ai import Agent  # noqa: E402
from pydantic_ai.messages import (  # noqa: E402
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel  # noqa: E402
from pydantic_ai.models.test import TestModel  # noqa: E402

import livingai_tasks as lai  # noqa: E402
from livingai_tasks import ConfigError, ExecutionStatus, NodeType, Status  # noqa: E402
from livingai_tasks.adapters.pydantic_ai import DurableAgent, _decision  # noqa: E402
from livingai_tasks.journal import is_call, token_totals  # noqa: E402
from livingai_tasks.nodes import ExecutionNode, Meta  # noqa: E402

from .eager import crashed_step, deliver_again, eager_store, flush, store

pytestmark = pytest.mark.timeout(60)

app = Celery("pyai_eager")
app.conf.update(task_always_eager=True, task_eager_propagates=False)
seen: dict[str, int] = {}
crash: dict[str, str] = {}


class Crash(BaseException):
    """Stands for the process dying: nothing of the step runs after it, nothing records."""


def _tick(name: str) -> None:
    seen[name] = seen.get(name, 0) + 1
    if crash.get("at") == name:
        raise Crash()


def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    turn = sum(isinstance(m, ModelResponse) for m in messages)
    _tick(f"model:{turn}")
    if turn == 0:
        return ModelResponse(parts=[ToolCallPart("lookup", {"order": "A-17"}, tool_call_id="c0")])
    if turn == 1:
        return ModelResponse(parts=[ToolCallPart("refund", {"order": "A-17"}, tool_call_id="c1")])
    returns = [p.content for m in messages if isinstance(m, ModelRequest) for p in m.parts
               if p.part_kind == "tool-return"]
    return ModelResponse(parts=[TextPart(f"done: {returns}")])


agent = Agent(FunctionModel(respond, model_name="scripted"), name="support")


@agent.tool_plain(metadata={"livingai": {"idempotent": True}})
def lookup(order: str) -> str:
    _tick("lookup")
    return f"{order} is paid"


@agent.tool_plain
def refund(order: str) -> dict[str, Any]:
    _tick("refund")
    return {"refunded": order}


durable = DurableAgent(agent)


@lai.agent_step(app, name="pyai.support")
def support(text: str) -> str:
    out = durable.run_sync(text).output
    _tick("after_run")
    return str(out)


@pytest.fixture(autouse=True)
def installed(tmp_path: Any) -> Iterator[None]:
    seen.clear()
    crash.clear()
    with eager_store(app, tmp_path, "pyai"):
        yield


EXPECTED = "done: ['A-17 is paid', {'refunded': 'A-17'}]"


def _crashed(at: str) -> ExecutionNode:
    crash["at"] = at
    try:
        return crashed_step(lambda: lai.start(support.s("refund A-17")), Crash)  # type: ignore[no-any-return]
    finally:
        crash.clear()


def _again(step: ExecutionNode) -> Any:
    return deliver_again(support, step, "refund A-17")


def test_outside_a_step_the_agent_runs_as_it_would_and_records_nothing() -> None:
    assert durable.run_sync("refund A-17").output == EXPECTED
    assert store().list_executions() == []


def test_model_requests_and_tool_calls_are_journaled_with_usage() -> None:
    run = lai.start(support.s("refund A-17"))
    assert run.get() == EXPECTED
    flush()
    step, *calls = store().nodes(run.execution_id)
    assert [c.type for c in calls] == [NodeType.PROMPT, NodeType.TOOL, NodeType.PROMPT,
                                       NodeType.TOOL, NodeType.PROMPT]
    assert all(c.parent_id == step.id and c.status is Status.SUCCESS for c in calls)
    names = [c.metadata[Meta.CALL_NAME] for c in calls]
    assert names[0] == "support__model.request" and names[1].endswith("call_tool:lookup")
    assert names[3].endswith("call_tool:refund")
    assert calls[1].is_idempotent() and not calls[3].is_idempotent()  # tool metadata decides
    assert [v.status for v in store().node_versions(calls[3].id)] == [Status.RUNNING,
                                                                       Status.SUCCESS]
    models = [c for c in calls if c.type is NodeType.PROMPT]
    assert all(c.metadata[Meta.MODEL] == "scripted" and c.metadata[Meta.USAGE]["total_tokens"]
               > 0 for c in models)
    totals = token_totals(store().nodes(run.execution_id))
    assert totals["calls"] == 3 and totals["total_tokens"] == sum(c.cost_tokens for c in models)


def test_a_rerun_after_a_crash_replays_the_model_and_never_repeats_the_refund() -> None:
    tokens = None
    step = _crashed("after_run")  # the run ended, the step did not
    assert seen == {"model:0": 1, "lookup": 1, "model:1": 1, "refund": 1, "model:2": 1,
                    "after_run": 1}
    tokens = token_totals(store().nodes(step.execution_id))
    assert _again(step).get() == EXPECTED
    assert (seen["model:0"], seen["model:1"], seen["model:2"], seen["refund"],
            seen["lookup"]) == (1, 1, 1, 1, 1)
    flush()
    assert token_totals(store().nodes(step.execution_id)) == tokens  # counted once
    assert store().get_execution(step.execution_id).status is ExecutionStatus.COMPLETED


def test_the_model_request_killed_runs_again_and_nothing_before_it() -> None:
    step = _crashed("model:2")  # after the refund, inside the last model request
    assert _again(step).get() == EXPECTED
    assert (seen["model:0"], seen["model:1"], seen["model:2"], seen["refund"]) == (1, 1, 2, 1)


def test_a_refund_killed_mid_call_holds_the_step_in_doubt_and_never_runs_again() -> None:
    step = _crashed("refund")
    with pytest.raises(lai.StepInDoubtError, match="refund"):
        _again(step).get()
    assert seen["refund"] == 1 and seen.get("model:2") is None
    flush()
    held = [n for n in store().nodes(step.execution_id)
            if is_call(n) and n.status is Status.IN_DOUBT]
    assert [n.metadata[Meta.CALL_NAME].rsplit(":", 1)[1] for n in held] == ["refund"]
    assert store().get_execution(step.execution_id).status is ExecutionStatus.IN_DOUBT


def test_test_model_agents_work_too_and_a_name_is_required() -> None:
    anonymous = Agent(TestModel())
    with pytest.raises(ConfigError, match="needs a name"):
        DurableAgent(anonymous)
    with pytest.raises(ConfigError, match="wraps a pydantic_ai.Agent"):
        DurableAgent("agent")  # type: ignore[arg-type]
    named = DurableAgent(anonymous, name="anon")

    @lai.agent_step(app, name="pyai.anon")
    def anon() -> str:
        return str(named.run_sync("hi").output)

    assert lai.start(anon.s()).get() == "success (no tool calls)"


def test_approval_payloads_are_read_strictly() -> None:
    assert _decision(True, "wire") is True and _decision({"approved": True}, "wire") is True
    denied = _decision({"approved": False, "reason": "too much"}, "wire")
    assert not isinstance(denied, bool) and denied.message == "too much"
    with pytest.raises(ConfigError, match="accepted: true, false"):
        _decision({"ok": 1}, "wire")


def test_an_async_tool_reads_its_own_call_key() -> None:
    keys: list[str] = []
    keyed = Agent(TestModel(call_tools=["charge"]), name="keyed")

    @keyed.tool_plain
    async def charge(amount: int) -> str:
        keys.append(lai.idempotency_key())
        return "charged"

    durable_keyed = DurableAgent(keyed)

    @lai.agent_step(app, name="pyai.keyed")
    def keyed_step() -> str:
        return str(durable_keyed.run_sync("charge").output)

    run = lai.start(keyed_step.s())
    run.get()
    flush()
    [tool] = [n for n in store().nodes(run.execution_id)
              if is_call(n) and n.type is NodeType.TOOL]
    assert keys == [lai.celery_wing.context.idempotency_key_of(  # type: ignore[attr-defined]
        run.execution_id, tool.id)]
