"""run_durably: an OpenAI Agents SDK run inside a step, and its tool approvals mapped onto
the step's durable waits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from agents import Agent, RunConfig, Runner, RunResult, ToolApprovalItem
from agents.items import TResponseInputItem

from ...celery_wing.waits import wait_for
from ...celery_wing.wake import send
from ...errors import ConfigError, WaitTimeout
from .journal import RUN, RunScope
from .wrap import durable_agent, durable_run_config

__all__ = ["run_durably", "approval_event", "approve_tool_call", "reject_tool_call"]


# -- approvals ------------------------------------------------------------------------------

def approval_event(call_id: str) -> str:
    """The event a run_durably step waits for while the tool call `call_id` (the model's
    tool call id) waits for approval."""
    return f"openai-agents.approval:{call_id}"


def approve_tool_call(execution_id: str, call_id: str, *, by: str | None = None,
                      comment: str | None = None) -> bool:
    """Approve a tool call a run_durably step waits on (lai.send of its approval event)."""
    return send(execution_id, approval_event(call_id),
                {"approved": True, "by": by, "comment": comment}, key="decision")


def reject_tool_call(execution_id: str, call_id: str, *, reason: str | None = None,
                     by: str | None = None) -> bool:
    """Reject it: the model is told `reason` (or the SDK's default rejection message)."""
    return send(execution_id, approval_event(call_id),
                {"approved": False, "by": by, "reason": reason}, key="decision")


def _decide(state: Any, item: ToolApprovalItem, timeout: timedelta | float | None) -> None:
    call_id = item.call_id
    if not call_id:
        raise ConfigError(f"Tool call {item.name!r} awaits approval but has no call id to "
                          "name its approval event.")
    try:
        decision = wait_for(approval_event(call_id), timeout=timeout)
    except WaitTimeout:
        state.reject(item, rejection_message="The tool call was not approved in time.")
        return
    approved = decision.get("approved") if isinstance(decision, dict) else decision
    if approved is True:
        state.approve(item)
    elif approved is False:
        reason = decision.get("reason") if isinstance(decision, dict) else None
        state.reject(item, rejection_message=reason)
    else:
        raise ConfigError(f"Approval event {approval_event(call_id)!r} carried {decision!r}; "
                          'accepted: {"approved": true|false, "reason": "..."} or a bool.')


# -- the runner -----------------------------------------------------------------------------

def run_durably(agent: Agent[Any], input: str | list[TResponseInputItem], *,
                context: Any = None, max_turns: int | None = None,
                run_config: RunConfig | None = None, hooks: Any = None,
                approval_timeout: timedelta | float | None = None) -> RunResult:
    """Run `agent` on `input` (Runner.run_sync) with its model responses and function tool
    calls journaled in the running step; returns the SDK's RunResult.

    Call it inside an @lai.agent_step body (outside a step it runs the agent unjournaled).
    A tool with needs_approval makes the step wait for the event approval_event(call_id)
    (approve_tool_call / reject_tool_call, or `livingai-tasks send`): the step frees its
    worker and, once decided, runs again from its start, replaying its journal up to the
    approval. Undecided after `approval_timeout`, the call is rejected.

    Raises what the run raises; a journal error (StepInDoubtError, CallOrderError,
    FencedOutError, NotDurableError) is raised as itself even when the SDK wrapped it."""
    durable = durable_agent(agent)
    config = durable_run_config(run_config)
    options: dict[str, Any] = {"context": context, "run_config": config, "hooks": hooks}
    if max_turns is not None:
        options["max_turns"] = max_turns
    run = RunScope()
    token = RUN.set(run)
    try:
        result = _run_sync(durable, input, options)
        while result.interruptions:
            state = result.to_state()
            for item in _approvals(result.interruptions):
                _decide(state, item, approval_timeout)
            result = _run_sync(durable, state, options)
        return result
    except BaseException as exc:
        if run.fatal is not None and exc is not run.fatal:
            raise run.fatal from exc
        raise
    finally:
        RUN.reset(token)


def _approvals(items: Iterable[Any]) -> list[ToolApprovalItem]:
    items = list(items)
    found = [i for i in items if isinstance(i, ToolApprovalItem)]
    if len(found) != len(items):
        raise ConfigError("run_durably maps tool approvals onto waits; the run was "
                          f"interrupted by something else: {items!r}.")
    return found


_sdk_loop = threading.local()


def _run_sync(agent: Agent[Any], input: Any, options: dict[str, Any]) -> RunResult:
    """Runner.run_sync on an event loop of the SDK's own (one per thread, the same on every
    run, as the SDK expects), with the thread's default loop put back after. The SDK runs on
    the thread's default loop and calls shutdown_asyncgens() on it after every run, after
    which another library's async generators on that loop (Pydantic AI's run_sync in the same
    worker process) are scheduled on a shut-down loop."""
    policy = asyncio.get_event_loop_policy()
    loop = getattr(_sdk_loop, "loop", None)
    if loop is None or loop.is_closed():
        loop = _sdk_loop.loop = policy.new_event_loop()
    # The current default without creating one (get_event_loop() would, and may warn).
    previous = getattr(getattr(policy, "_local", None), "_loop", None)
    policy.set_event_loop(loop)
    try:
        return Runner.run_sync(agent, input, **options)
    finally:
        policy.set_event_loop(previous)
