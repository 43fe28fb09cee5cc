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

from ...errors import ConfigError, LivingAIError
from . import _framework  # noqa: F401  (the missing-extra error)
from .scope import journaled

__all__ = ["JournaledTool", "ToolError", "idempotent", "journaled_tool"]

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

    @classmethod
    def wrap(cls, tool: BaseTool, *, idempotent: bool = False) -> JournaledTool:
        if isinstance(tool, JournaledTool):
            return tool if tool.idempotent == idempotent else cls.wrap(tool.inner,
                                                                       idempotent=idempotent)
        if not isinstance(tool, BaseTool):
            raise ConfigError(f"A CrewAI tool (crewai.tools.BaseTool, or @tool) is journaled, "
                              f"got {tool!r}.")
        return cls(name=tool.name, description=tool.description, args_schema=tool.args_schema,
                   result_schema=tool.result_schema, env_vars=tool.env_vars,
                   cache_function=tool.cache_function, result_as_answer=tool.result_as_answer,
                   max_usage_count=tool.max_usage_count or _NO_LIMIT,
                   tool_failure_policy=tool.tool_failure_policy, inner=tool,
                   idempotent=idempotent)

    def _run(self, *args: Any, **kwargs: Any) -> Any:
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


def idempotent(tool: BaseTool) -> JournaledTool:
    """Mark a CrewAI tool safe to run twice: journaled, and run again on a re-run when a
    crash hit it mid-call (instead of holding the step IN_DOUBT)."""
    return JournaledTool.wrap(tool, idempotent=True)


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
