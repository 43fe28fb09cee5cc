"""The CrewAI adapter (livingai_tasks.adapters.crewai) in Celery's eager mode on a real SQLite
store: a crew's model calls and tool runs are journaled calls of the step, recorded as JSON
with their token usage; a re-run after a crash replays them; a crash inside a
non-idempotent tool holds the step. Real workers killed mid-run are in
test_crewai_workers.py; Flow persistence in test_crewai_flows.py. Offline: a scripted
BaseLLM (tests/crewai_fake.py), telemetry and tracing off."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from .tools import import_crewai_or_skip

import_crewai_or_skip()  # before anything imports CrewAI (its telemetry off first)

from celery import Celery  # noqa: E402
from crewai import Agent, Crew, Task  # noqa: E402
from crewai.tools import tool  # noqa: E402
from pydantic import BaseModel  # noqa: E402

import livingai_tasks as lai  # noqa: E402
from livingai_tasks import ConfigError, ExecutionStatus, NodeType, Status  # noqa: E402
from livingai_tasks.adapters.crewai import (  # noqa: E402
    JournaledLLM,
    JournaledTool,
    ToolError,
    durable_crew,
    journaling,
    kickoff_durably,
    needs_approval,
)
from livingai_tasks.adapters.crewai.llm import _decode, _encode  # noqa: E402
from livingai_tasks.journal import is_call, token_totals  # noqa: E402
from livingai_tasks.nodes import ExecutionNode, Meta  # noqa: E402

from .crewai_fake import ScriptedLLM, build_crew, build_native_crew  # noqa: E402
from .eager import crashed_step, deliver_again, eager_store, flush, journaled_calls, store  # noqa: E402

# CrewAI reads its own deprecated fields (function_calling_llm...) while building an agent.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:crewai.*")
app = Celery("crewai_adapter")
app.conf.update(task_always_eager=True, task_eager_propagates=False)
seen: dict[str, int] = {}
plan_for: dict[str, str] = {}
EXPECTED = 'done: ["order o1: 42 EUR", "{\'refunded\': 42, \'order\': \'o1\', ' \
    '\'refund_no\': 1}", "note refunded #1"]'
TOKENS = {"input_tokens": 406, "output_tokens": 46, "total_tokens": 452, "calls": 4}


class Crash(BaseException):
    """Stands for the process dying: nothing runs after it, nothing records."""


def _count(name: str) -> int:
    seen[name] = seen.get(name, 0) + 1
    return seen[name]


def _pause(name: str) -> None:
    if plan_for.get("crash_in") == name:
        raise Crash()


@lai.agent_step(app, name="crewai.support")
def support(label: str) -> dict[str, Any]:
    out = kickoff_durably(build_crew(label, _count, _pause))
    return {"answer": out.raw, "tokens": out.token_usage.total_tokens}


@pytest.fixture(autouse=True)
def installed(tmp_path: Any) -> Iterator[None]:
    seen.clear()
    plan_for.clear()
    with eager_store(app, tmp_path, "crewai"):
        yield


def _again(step: ExecutionNode) -> Any:
    return deliver_again(support, step, "s")


def _crashed(where: str) -> ExecutionNode:
    plan_for["crash_in"] = where
    try:
        return crashed_step(lambda: lai.start(support.s("s")), Crash)  # type: ignore[no-any-return]
    finally:
        plan_for.clear()


_calls = journaled_calls


# -- a run, journaled ---------------------------------------------------------------------

def test_a_crew_run_records_its_model_and_tool_calls_with_their_tokens() -> None:
    result = lai.start(support.s("s"))
    assert result.get() == {"answer": EXPECTED, "tokens": 452}
    flush()
    calls = _calls(result.execution_id)
    assert [(c.metadata[Meta.CALL_NAME].split("#")[0], c.type, c.status) for c in calls] == [
        ("model:scripted-1", NodeType.PROMPT, Status.SUCCESS),
        ("tool:lookup", NodeType.TOOL, Status.SUCCESS),
        ("model:scripted-1", NodeType.PROMPT, Status.SUCCESS),
        ("tool:refund", NodeType.TOOL, Status.SUCCESS),
        ("model:scripted-1", NodeType.PROMPT, Status.SUCCESS),
        ("tool:note", NodeType.TOOL, Status.SUCCESS),
        ("model:scripted-1", NodeType.PROMPT, Status.SUCCESS)]
    assert [c.metadata[Meta.IDEMPOTENT] for c in calls if c.type is NodeType.TOOL] == \
        [True, False, False]
    assert calls[3].output == {"result": {"refunded": 42, "order": "o1", "refund_no": 1}}
    assert calls[0].metadata[Meta.USAGE] == {"input_tokens": 100, "output_tokens": 10,
                                             "total_tokens": 110}
    assert calls[0].metadata[Meta.MODEL] == "scripted-1"
    totals = token_totals(store().nodes(result.execution_id))
    assert {k: totals[k] for k in TOKENS} == TOKENS
    assert seen == {"s:model:0": 1, "s:lookup": 1, "s:model:1": 1, "s:refund": 1,
                    "s:model:2": 1, "s:note": 1, "s:model:3": 1}


def test_outside_a_step_the_crew_runs_unjournaled() -> None:
    out = kickoff_durably(build_crew("plain", _count, _pause))
    assert out.raw == EXPECTED and out.token_usage.total_tokens == 452
    assert store().list_executions() == []


# -- re-runs after a crash ----------------------------------------------------------------

def test_a_crash_in_the_last_model_call_replays_everything_before_it() -> None:
    step = _crashed("s:model:3")
    assert seen["s:refund"] == 1 and seen["s:model:3"] == 1
    seen.clear()
    assert _again(step).get() == {"answer": EXPECTED, "tokens": 452}
    # the recorded model calls and tools did not run again; the interrupted call did
    assert seen == {"s:model:3": 1}
    totals = token_totals(store().nodes(step.execution_id))
    assert {k: totals[k] for k in TOKENS} == TOKENS  # each call counted once


def test_a_crash_inside_the_refund_holds_the_step_in_doubt() -> None:
    step = _crashed("s:refund")
    assert seen["s:refund"] == 1
    seen.clear()
    _again(step)
    flush()
    execution = store().get_execution(step.execution_id)
    assert execution.status is ExecutionStatus.IN_DOUBT
    assert "refund" in execution.reason
    assert "s:refund" not in seen and "s:model:2" not in seen  # nothing ran after it
    [held] = [c for c in _calls(step.execution_id) if c.status is Status.IN_DOUBT]
    assert held.metadata[Meta.CALL_NAME].startswith("tool:refund#")


def test_a_crash_inside_an_idempotent_tool_runs_it_again() -> None:
    step = _crashed("s:lookup")
    seen.clear()
    assert _again(step).get() == {"answer": EXPECTED, "tokens": 452}
    assert seen["s:lookup"] == 1 and "s:model:0" not in seen


def test_a_failed_model_call_fails_the_step() -> None:
    plan_for["crash_in"] = "never"

    def boom(name: str) -> None:
        if name == "f:model:1":
            raise RuntimeError("provider down")

    @lai.agent_step(app, name="crewai.failing")
    def failing() -> str:
        crew = build_crew("f", _count, boom)
        crew.agents[0].max_retry_limit = 2  # CrewAI's default: it runs the task again
        return kickoff_durably(crew).raw

    result = lai.start(failing.s())
    with pytest.raises(RuntimeError, match="provider down"):
        result.get(propagate=True)
    flush()
    calls = _calls(result.execution_id)
    assert [c.status for c in calls] == [Status.SUCCESS, Status.SUCCESS, Status.FAILED]
    assert seen.get("f:model:2") is None  # CrewAI's task retry did not go on


@lai.agent_step(app, name="crewai.native")
def native(label: str) -> str:
    return kickoff_durably(build_native_crew(label, _count, _pause)).raw


def test_native_tool_calls_of_one_turn_run_in_order_and_replay() -> None:
    plan_for["crash_in"] = "n:model:2"
    with pytest.raises(Crash):
        lai.start(native.s("n"))
    plan_for.clear()
    flush()
    [execution] = store().list_executions()
    [step] = [n for n in store().nodes(execution.id) if not is_call(n)]
    calls = _calls(execution.id)
    # the two tool calls of the first turn ran one after the other, in the model's order
    assert [c.metadata[Meta.CALL_NAME].split("#")[0] for c in calls] == [
        "model:native-1", "tool:lookup", "tool:note", "model:native-1", "tool:refund"]
    assert calls[0].output["answer"]["tool_calls"][1]["function"]["name"] == "note"
    seen.clear()
    fence = store().get_execution(execution.id).fence
    answer = native.apply(("n",), task_id=step.id, headers={
        "lai_execution_id": execution.id, "lai_seq": step.seq, "lai_fence": fence}).get()
    assert answer == 'done: ["order o1: 42 EUR", "note seen #1", ' \
        '"{\'refunded\': 42, \'order\': \'o1\', \'refund_no\': 1}"]'
    assert seen == {"n:model:2": 1}  # only the interrupted model call ran again


def test_a_tool_error_is_recorded_and_replayed_as_the_same_error() -> None:
    @tool("flaky")
    def flaky(x: str) -> str:
        """Fails the first time."""
        if _count("flaky") == 1:
            raise RuntimeError(f"no {x} today")
        return "fine"

    @lai.agent_step(app, name="crewai.flaky")
    def uses_flaky() -> list[str]:
        wrapped = JournaledTool.wrap(flaky)
        got = []
        with journaling():  # what kickoff_durably opens around the crew
            for _ in range(2):
                try:
                    got.append(wrapped.run(x="y"))
                except Exception as exc:  # noqa: BLE001 - what CrewAI would show the model
                    got.append(f"{type(exc).__name__}: {exc}")
        _pause("after flaky")
        return got

    plan_for["crash_in"] = "after flaky"
    with pytest.raises(Crash):
        lai.start(uses_flaky.s())
    plan_for.clear()
    flush()
    [execution] = store().list_executions()
    [step] = [n for n in store().nodes(execution.id) if not is_call(n)]
    assert [c.output for c in _calls(execution.id)] == [
        {"error": "no y today"}, {"result": "fine"}]
    fence = store().get_execution(execution.id).fence
    again = uses_flaky.apply(task_id=step.id, headers={
        "lai_execution_id": execution.id, "lai_seq": step.seq, "lai_fence": fence})
    # the same error text the first time and on the re-run, the tool not run again
    assert again.get() == ["ToolError: no y today", "fine"] and seen["flaky"] == 2


# -- approvals (the durable wait itself is on real workers: test_crewai_workers.py) ----------

def test_approval_decisions_reach_the_model_as_the_tools_answer(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from livingai_tasks.adapters.crewai import wrap

    @tool("wire")
    def wire(amount: int) -> str:
        """Wire money."""
        _count("wire")
        return f"wired {amount}"

    gated = needs_approval(wire, timeout=60)
    with pytest.raises(ToolError, match="only when run inside a step"):
        gated.run(amount=1)  # outside a step: never run unapproved
    asked: list[Any] = []
    decisions: list[Any] = [{"approved": True, "by": "alice"},
                            {"approved": False, "reason": "too much"},
                            lai.WaitTimeout("late"), "yes"]

    def wait_for(name: str, timeout: Any = None) -> Any:
        asked.append((name, timeout))
        decision = decisions.pop(0)
        if isinstance(decision, BaseException):
            raise decision
        return decision

    monkeypatch.setattr(wrap, "wait_for", wait_for)

    got: list[str] = []

    @lai.agent_step(app, name="crewai.gated")
    def gated_step() -> list[str]:
        with journaling():
            for _ in range(4):
                try:
                    got.append(gated.run(amount=5))
                except ToolError as exc:  # what CrewAI shows the model
                    got.append(str(exc))
        return got

    result = lai.start(gated_step.s())
    with pytest.raises(ConfigError, match="carried 'yes'"):  # a malformed decision: fails
        result.get(propagate=True)
    assert got == ["wired 5", "The call of wire was not approved: too much",
                   "The call of wire was not approved: no decision came in time"]
    assert asked == [("crewai.approval:wire", 60)] * 4 and seen["wire"] == 1
    flush()
    assert [c.output for c in _calls(result.execution_id)] == [{"result": "wired 5"}]


# -- wrapping -----------------------------------------------------------------------------

def test_durable_crew_wraps_llms_and_tools_once() -> None:
    crew = build_crew("w", _count, _pause)
    durable_crew(crew)
    agent = crew.agents[0]
    assert isinstance(agent.llm, JournaledLLM) and isinstance(agent.llm.inner, ScriptedLLM)
    assert all(isinstance(t, JournaledTool) for t in agent.tools)
    assert [t.idempotent for t in agent.tools] == [True, False, False]
    llm, tools = agent.llm, list(agent.tools)
    durable_crew(crew)
    assert agent.llm is llm and agent.tools == tools


def test_a_task_run_asynchronously_is_refused() -> None:
    crew = build_crew("a", _count, _pause)
    agent = crew.agents[0]
    crew = Crew(agents=[agent], tasks=[
        Task(description="one", expected_output="x", agent=agent, async_execution=True),
        Task(description="two", expected_output="y", agent=agent)])
    with pytest.raises(ConfigError, match="async_execution"):
        durable_crew(crew)


def test_tools_crewai_adds_at_run_time_are_refused() -> None:
    crew = build_crew("m", _count, _pause)
    crew.agents[0].mcps = ["https://mcp.example.com/mcp"]
    with pytest.raises(ConfigError, match="mcps"):
        durable_crew(crew)


class Verdict(BaseModel):
    ok: bool
    reason: str


def test_model_answers_round_trip_through_json() -> None:
    assert _decode(_encode("hi"), None) == "hi"
    verdict = Verdict(ok=True, reason="fine")
    assert _decode(_encode(verdict), Verdict) == verdict

    class Fn:
        name = "refund"
        arguments = {"order": "o1"}

    class Call:
        id = "c1"
        function = Fn()

    assert _decode(_encode([Call()]), None) == [{"id": "c1", "type": "function", "function": {
        "name": "refund", "arguments": '{"order": "o1"}'}}]
    with pytest.raises(ConfigError, match="records text"):
        _encode(object())


def test_a_non_crewai_llm_is_refused() -> None:
    with pytest.raises(ConfigError, match="BaseLLM"):
        JournaledLLM.wrap("gpt-4o")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="BaseTool"):
        JournaledTool.wrap(lambda: 1)  # type: ignore[arg-type]


def test_agent_tools_keep_their_schema() -> None:
    crew = durable_crew(build_crew("sch", _count, _pause))
    refund = crew.agents[0].tools[1]
    assert refund.name == "refund" and refund.description == "Refund an order."
    assert set(refund.args_schema.model_fields) == {"order", "amount"}
    assert isinstance(crew.agents[0], Agent)
