"""The OpenAI Agents SDK adapter (livingai_tasks.adapters.openai_agents) in Celery's eager
mode on a real SQLite store: model responses and tool calls of an agent run are journaled
calls of the step, recorded as JSON and rebuilt faithfully; a re-run after a crash replays
them; a crash inside a non-idempotent tool holds the step. Real workers killed mid-run are
in test_worker_openai_agents.py. Offline: a scripted fake model, tracing disabled."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest

agents = pytest.importorskip("agents")

from agents import Agent, ModelResponse, Usage, function_tool  # noqa: E402
from agents.mcp import MCPServerStdio  # noqa: E402
from agents.testing import assistant_message, function_call  # noqa: E402
from agents.tool import LocalShellTool  # noqa: E402
from celery import Celery  # noqa: E402
from openai.types.responses import ResponseReasoningItem  # noqa: E402
from openai.types.responses.response_reasoning_item import Summary  # noqa: E402
from openai.types.responses.response_usage import (  # noqa: E402
    InputTokensDetails,
    OutputTokensDetails,
)

import livingai_tasks as lai  # noqa: E402
from livingai_tasks import ConfigError, ExecutionStatus, NodeType, Status  # noqa: E402
from livingai_tasks.adapters.openai_agents import (  # noqa: E402
    JournaledModel,
    durable_agent,
    response_from_json,
    response_to_json,
    run_durably,
)
from livingai_tasks.journal import call_node_id, token_totals  # noqa: E402
from livingai_tasks.nodes import ExecutionNode, Meta  # noqa: E402

from .eager import crashed_step, deliver_again, eager_store, flush, journaled_calls, store  # noqa: E402
from .oaiagents_fake import build_agent, usage_of_turn  # noqa: E402

os.environ.setdefault("OPENAI_API_KEY", "sk-test-dummy")  # never used: no request is made
agents.set_tracing_disabled(True)

app = Celery("oai_adapter")
app.conf.update(task_always_eager=True, task_eager_propagates=False)
seen: dict[str, int] = {}
plan_for: dict[str, str] = {}
EXPECTED = 'done: ["order o1: 42 EUR", "{\'refunded\': 42, \'order\': \'o1\'}", ' \
    '"note a #1", "note b #1"]'


class Crash(BaseException):
    """Stands for the process dying: nothing runs after it, nothing records."""


def _count(name: str) -> int:
    seen[name] = seen.get(name, 0) + 1
    return seen[name]


def _pause(name: str) -> None:
    if plan_for.get("crash_in") == name:
        raise Crash()


@lai.agent_step(app, name="oai.support")
def support(label: str) -> dict[str, Any]:
    result = run_durably(build_agent(label, _count, _pause), "Refund my order, please.")
    return {"answer": result.final_output}


@pytest.fixture(autouse=True)
def installed(tmp_path: Any) -> Iterator[None]:
    seen.clear()
    plan_for.clear()
    with eager_store(app, tmp_path, "oai"):
        yield


def _again(step: ExecutionNode) -> Any:
    return deliver_again(support, step, "o1")


def _crashed(where: str) -> ExecutionNode:
    plan_for["crash_in"] = where
    try:
        return crashed_step(lambda: lai.start(support.s("o1")), Crash)  # type: ignore[no-any-return]
    finally:
        plan_for.clear()


_calls = journaled_calls


# -- JSON of model responses ------------------------------------------------------------------

def test_a_model_response_round_trips_through_json_faithfully() -> None:
    usage = Usage(requests=1, input_tokens=120, output_tokens=30, total_tokens=150,
                  input_tokens_details=InputTokensDetails(cached_tokens=20, cache_write_tokens=0),
                  output_tokens_details=OutputTokensDetails(reasoning_tokens=7))
    response = ModelResponse(
        output=[ResponseReasoningItem(id="r1", type="reasoning",
                                      summary=[Summary(text="think", type="summary_text")]),
                function_call("refund", {"order": "o1", "amount": 42}, call_id="c1"),
                assistant_message("hello", item_id="m1")],
        usage=usage, response_id="resp-1", request_id="req-1",
        raw_usage={"input_tokens": 120})
    recorded = json.loads(json.dumps(response_to_json(response)))  # what a store keeps
    rebuilt = response_from_json(recorded)
    assert rebuilt == response
    assert [type(i) for i in rebuilt.output] == [type(i) for i in response.output]
    assert [i.model_fields_set for i in rebuilt.output] == [
        i.model_fields_set for i in response.output]
    assert rebuilt.usage.input_tokens_details.cached_tokens == 20
    assert rebuilt.to_input_items() == response.to_input_items()


# -- a run inside a step ----------------------------------------------------------------------

def test_outside_a_step_the_agent_just_runs() -> None:
    assert run_durably(build_agent("o1", _count), "hi").final_output == EXPECTED
    assert store().list_executions() == [] and seen["o1:model"] == 4


def test_model_responses_and_tool_calls_are_journaled_with_tokens() -> None:
    agent = build_agent("o1", _count, _pause)
    tool_invokers = [t.on_invoke_tool for t in agent.tools]
    assert run_durably(agent, "hi").final_output == EXPECTED
    assert [t.on_invoke_tool for t in agent.tools] == tool_invokers  # the user's, untouched
    seen.clear()
    assert lai.start(support.s("o1")).get() == {"answer": EXPECTED}
    flush()
    [execution] = store().list_executions()
    calls = _calls(execution.id)
    assert [c.metadata[Meta.CALL_NAME] for c in calls] == [
        "model:ScriptedCountingModel", "tool:lookup", "model:ScriptedCountingModel",
        "tool:refund", "model:ScriptedCountingModel", "tool:note", "tool:note",
        "model:ScriptedCountingModel"]
    assert [c.type for c in calls].count(NodeType.PROMPT) == 4
    lookup, refund = calls[1], calls[3]
    assert lookup.is_idempotent() and not refund.is_idempotent()
    assert [v.status for v in store().node_versions(refund.id)] == [Status.RUNNING,
                                                                     Status.SUCCESS]
    assert refund.output == {"refunded": 42, "order": "o1"}
    # the two parallel notes are journaled one after the other, in the model's order
    assert [c.input["args"][0]["arguments"] for c in calls[5:7]] == ['{"text":"a"}',
                                                                     '{"text":"b"}']
    assert calls[0].metadata[Meta.USAGE] == {"input_tokens": 100, "output_tokens": 10,
                                             "total_tokens": 110}
    assert response_from_json(calls[2].output).usage == usage_of_turn(1)
    totals = token_totals(store().nodes(execution.id))
    assert totals["calls"] == 4 and totals["total_tokens"] == sum(
        usage_of_turn(t).total_tokens for t in range(4))
    assert store().get_execution(execution.id).status is ExecutionStatus.COMPLETED


def test_a_rerun_after_a_crash_replays_recorded_responses_and_tools() -> None:
    step = _crashed("o1:model:3")  # the model call after the refund and the notes
    assert seen["o1:refund"] == 1 and seen["o1:model:3"] == 1
    assert _again(step).get() == {"answer": EXPECTED}
    # nothing recorded ran again; the call the crash interrupted did
    assert [seen[f"o1:model:{t}"] for t in range(4)] == [1, 1, 1, 2]
    assert (seen["o1:lookup"], seen["o1:refund"], seen["o1:note:a"], seen["o1:note:b"]) == \
        (1, 1, 1, 1)
    flush()
    assert token_totals(store().nodes(step.execution_id))["calls"] == 4


def test_a_crash_inside_a_non_idempotent_tool_holds_the_step_in_doubt() -> None:
    step = _crashed("o1:refund")
    refund_id = call_node_id(step.id, 3)
    assert store().get_node(refund_id).status is Status.RUNNING  # durable before it ran
    with pytest.raises(lai.StepInDoubtError, match="may or may not have happened"):
        _again(step).get()
    flush()
    assert seen["o1:refund"] == 1 and seen["o1:model:0"] == 1
    assert store().get_node(refund_id).status is Status.IN_DOUBT
    assert store().get_execution(step.execution_id).status is ExecutionStatus.IN_DOUBT


def test_what_cannot_be_journaled_is_refused_with_what_to_do() -> None:
    with pytest.raises(ConfigError, match="runs locally outside the journal"):
        durable_agent(Agent(name="a", tools=[LocalShellTool(executor=lambda _: "")]))
    server = MCPServerStdio(params={"command": "true"})
    with pytest.raises(ConfigError, match="MCP servers"):
        durable_agent(Agent(name="a", mcp_servers=[server]))
    with pytest.raises(ConfigError, match="agents.Agent"):
        durable_agent("not an agent")  # type: ignore[arg-type]


def test_handoffs_and_model_instances_are_journaled_in_the_clone() -> None:
    @function_tool
    def ping() -> str:
        """Ping."""
        return "pong"

    helper = build_agent("o2", _count)
    main = Agent(name="main", handoffs=[helper], tools=[ping], model=helper.model)
    clone = durable_agent(main)
    assert isinstance(clone.model, JournaledModel) and clone is not main
    [handed] = clone.handoffs
    assert isinstance(handed, Agent) and isinstance(handed.model, JournaledModel)
    assert handed.tools[0].on_invoke_tool is not helper.tools[0].on_invoke_tool
    # the SDK copies tools: a copy keeps journaling
    journaled = clone.tools[0].on_invoke_tool
    assert type(copy.deepcopy(clone.tools[0]).on_invoke_tool) is type(journaled)
    assert type(copy.copy(clone.tools[0]).on_invoke_tool) is type(journaled)
    assert not isinstance(main.model, JournaledModel)


def test_approval_decisions_map_onto_the_sdks_approve_and_reject(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The wait itself is on real workers (test_worker_openai_agents.py); here, what each
    decision the event carries does to the SDK's RunState."""
    from agents import RunContextWrapper, ToolApprovalItem
    from agents.run_state import RunState

    from livingai_tasks.adapters.openai_agents import approval_event, runner

    agent = Agent(name="a")
    item = ToolApprovalItem(agent=agent, raw_item=function_call("refund", {}, call_id="c1"),
                            tool_name="refund")
    done: list[tuple[str, Any]] = []
    monkeypatch.setattr(RunState, "approve", lambda self, i: done.append(("approve", i)))
    monkeypatch.setattr(RunState, "reject", lambda self, i, rejection_message=None: done.append(
        ("reject", rejection_message)))
    state = RunState(context=RunContextWrapper(context=None), original_input="hi",
                     starting_agent=agent)
    asked: list[Any] = []

    def decided(payload: Any) -> None:
        def wait_for(name: str, timeout: Any = None) -> Any:
            asked.append((name, timeout))
            if isinstance(payload, BaseException):
                raise payload
            return payload
        monkeypatch.setattr(runner, "wait_for", wait_for)
        runner._decide(state, item, 60)

    decided({"approved": True, "by": "alice"})
    decided({"approved": False, "reason": "too much"})
    decided(True)
    decided(lai.WaitTimeout("late"))
    assert done == [("approve", item), ("reject", "too much"), ("approve", item),
                    ("reject", "The tool call was not approved in time.")]
    assert asked[0] == (approval_event("c1"), 60) == ("openai-agents.approval:c1", 60)
    with pytest.raises(ConfigError, match="accepted"):
        decided({"ok": 1})


def test_the_sdks_runner_retries_are_refused_in_a_journaled_run() -> None:
    from agents import ModelSettings
    from agents.retry import ModelRetrySettings

    agent = build_agent("o1", _count).clone(
        model_settings=ModelSettings(retry=ModelRetrySettings(max_retries=2)))
    with pytest.raises(ConfigError, match="max_retries=2"):
        run_durably(agent, "hi")
    assert "o1:model" not in seen
