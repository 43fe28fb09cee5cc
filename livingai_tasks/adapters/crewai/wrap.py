"""JournaledTool: a CrewAI tool whose every run is a journaled tool call of the step.

Wrapping the tool, not CrewAI's before/after_tool_call hooks: CrewAI swallows what a hook
raises, and a result handed back through an after-hook is the text shown to the model, not
the tool's result that CrewAI caches and formats. The wrapper is a BaseTool of its own with
the wrapped tool's name, description, argument schema and flags, so CrewAI sees the same
tool on both of its paths (ReAct text and native function calling).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
from typing import Any

from crewai.tools import BaseTool
from pydantic import BaseModel, Field

from ...celery_wing.waits import wait_for
from ...celery_wing.wake import send
from ...errors import ConfigError, LivingAIError, WaitTimeout
from . import _framework  # noqa: F401  (the missing-extra error)
from .scope import in_step, journaled, journaling_active

__all__ = ["JournaledTool", "ToolError", "idempotent", "journaled_tool", "needs_approval",
           "approval_event", "approve_tool_call", "reject_tool_call"]

APPROVAL_PREFIX = "crewai.approval:"  # the event a gated tool's step waits for

# A usage limit no run reaches. CrewAI runs the tool calls of one model turn in parallel
# threads unless a tool has a limit; the journal is keyed by order, so they must run one
# after the other, in the order the (recorded) model answer lists them, on every run.
_NO_LIMIT = sys.maxsize


class ToolError(Exception):
    """A tool's recorded failure, raised again on a re-run with the same message, so CrewAI
    shows the model the same "Error executing tool: ..." text as the first time."""


class JournaledTool(BaseTool):
    """A CrewAI tool run as a journaled call (kind "tool") named `tool:<name>#<digest of its
    arguments>`. Non-idempotent unless made with `idempotent(tool)`: a crash during it
    holds the step IN_DOUBT instead of running it twice."""

    inner: BaseTool = Field(exclude=True)
    idempotent: bool = Field(default=False, exclude=True)
    approval: bool = Field(default=False, exclude=True)
    approval_timeout: float | None = Field(default=None, exclude=True)  # seconds

    @classmethod
    def wrap(cls, tool: BaseTool, *, idempotent: bool = False, approval: bool = False,
             approval_timeout: float | None = None) -> JournaledTool:
        if isinstance(tool, JournaledTool):
            return cls.wrap(tool.inner, idempotent=idempotent or tool.idempotent,
                            approval=approval or tool.approval,
                            approval_timeout=approval_timeout or tool.approval_timeout)
        if not isinstance(tool, BaseTool):
            raise ConfigError(f"A CrewAI tool (crewai.tools.BaseTool, or @tool) is journaled, "
                              f"got {tool!r}.")
        return cls(name=tool.name, description=tool.description, args_schema=tool.args_schema,
                   result_schema=tool.result_schema, env_vars=tool.env_vars,
                   cache_function=tool.cache_function, result_as_answer=tool.result_as_answer,
                   max_usage_count=tool.max_usage_count or _NO_LIMIT,
                   tool_failure_policy=tool.tool_failure_policy, inner=tool,
                   idempotent=idempotent, approval=approval,
                   approval_timeout=approval_timeout)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
        if self.approval:
            self._approved()
        inner = self.inner

        def run(_request: Any) -> Any:
            try:
                result = inner._run(*args, **kwargs)
                if asyncio.iscoroutine(result):  # an async-only tool, as BaseTool.run does
                    result = asyncio.run(result)
            except LivingAIError:
                raise  # the journal's own (a nested call held, fenced out): ends the step
            except Exception as exc:  # noqa: BLE001 - recorded, and raised again below
                return {"error": f"{exc}"}
            return {"result": _jsonable(result)}

        request = {"args": list(args), "kwargs": kwargs}
        recorded = journaled(run, request, name=f"tool:{self.name}#{_digest(args, kwargs)}",
                             kind="tool", idempotent=self.idempotent)
        if "error" in recorded:
            raise ToolError(recorded["error"])
        return recorded["result"]

    def format_output_for_agent(self, raw_result: Any) -> str:
        return self.inner.format_output_for_agent(raw_result)

    def _approved(self) -> None:
        """Wait durably for this call's decision (the k-th call of the tool in a step gets
        the k-th event `approval_event(name)`): the step suspends without holding a worker
        and runs again from its start once decided, its journal replaying up to here.
        Denied, or undecided within approval_timeout, the model is told (ToolError)."""
        event = approval_event(self.name)
        if not journaling_active():
            raise ToolError(f"The call of {self.name} needs a person's approval, which a crew "
                            "gets only when run inside a step (kickoff_durably).")

        def wait() -> tuple[bool, str | None]:
            try:
                decision = wait_for(event, timeout=self.approval_timeout)
            except WaitTimeout:
                return False, "no decision came in time"
            # Checked here, inside the step: a malformed decision ends the step (CrewAI
            # would show an error raised by the tool to the model, and go on).
            approved = decision.get("approved") if isinstance(decision, dict) else decision
            if not isinstance(approved, bool):
                raise ConfigError(f"The approval event {event!r} carried {decision!r}; "
                                  'accepted: true, false, {"approved": true} or '
                                  '{"approved": false, "reason": "..."}.')
            reason = decision.get("reason") if isinstance(decision, dict) else None
            return approved, reason

        approved, reason = in_step(wait)
        if not approved:
            raise ToolError(f"The call of {self.name} was not approved"
                            + (f": {reason}" if reason else "."))


def idempotent(tool: BaseTool) -> JournaledTool:
    """Mark a CrewAI tool safe to run twice: journaled, and run again on a re-run when a
    crash hit it mid-call (instead of holding the step IN_DOUBT)."""
    return JournaledTool.wrap(tool, idempotent=True)


def needs_approval(tool: BaseTool, *, timeout: float | None = None) -> JournaledTool:
    """Gate a CrewAI tool on a person's decision: each call waits durably for the event
    `approval_event(tool.name)` (approve_tool_call / reject_tool_call). `timeout` in
    seconds (None: no limit); past it the call is rejected."""
    return JournaledTool.wrap(tool, approval=True, approval_timeout=timeout)


def approval_event(tool_name: str) -> str:
    """The event a step waits for while a call of the tool `tool_name` awaits approval."""
    return APPROVAL_PREFIX + tool_name


def approve_tool_call(execution_id: str, tool_name: str, *, by: str | None = None,
                      comment: str | None = None, key: str | None = None) -> bool:
    """Approve the next waiting call of `tool_name` in the execution (lai.send of its
    approval event; `key` makes a retried send count once)."""
    return send(execution_id, approval_event(tool_name),
                {"approved": True, "by": by, "comment": comment}, key=key)


def reject_tool_call(execution_id: str, tool_name: str, *, reason: str | None = None,
                     by: str | None = None, key: str | None = None) -> bool:
    """Reject it: the model is told the call was not approved, and `reason`."""
    return send(execution_id, approval_event(tool_name),
                {"approved": False, "by": by, "reason": reason}, key=key)


def journaled_tool(tool: BaseTool) -> JournaledTool:
    """`tool` journaled (non-idempotent); one already journaled is returned as it is."""
    return tool if isinstance(tool, JournaledTool) else JournaledTool.wrap(tool)


def _digest(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """Part of the call's name: two calls of one tool with other arguments met in swapped
    order on a re-run fail the step (CallOrderError) instead of swapping results."""
    text = json.dumps([list(args), kwargs], sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def _jsonable(result: Any) -> Any:
    """What the journal records of a tool's result: JSON as it is, a pydantic model as its
    JSON dump; anything else as its text (what CrewAI would show the model anyway)."""
    if isinstance(result, BaseModel):
        return result.model_dump(mode="json")
    try:
        json.dumps(result)
    except (TypeError, ValueError):
        return str(result)
    return result
