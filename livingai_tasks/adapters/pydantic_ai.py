"""Pydantic AI agents run durably inside a step: model requests and tool calls journaled.

    from pydantic_ai import Agent
    from livingai_tasks.adapters.pydantic_ai import DurableAgent

    agent = Agent("openai:gpt-4o-mini", name="support")   # a plain Pydantic AI agent
    durable = DurableAgent(agent)

    @lai.agent_step(app)
    def support(ticket: dict) -> dict:
        return {"answer": durable.run_sync(ticket["text"]).output}

How: Pydantic AI routes every model request and tool call of an agent through a durability
capability (`pydantic_ai.durable_exec.BaseDurabilityCapability`, the seam its Temporal, DBOS
and Prefect integrations use). `LivingAIDurability` is that capability for this library: its
operation backend runs each model request and each tool call as a journaled call of the
running step (`acall`, the async twin of `lai.call`), with the step's JSON journal as the
codec. So after a crash the re-run step replays the recorded model responses and tool
results, and a non-idempotent tool whose start is on record but not its end holds the step
IN_DOUBT instead of running twice.

- A tool is non-idempotent unless its metadata says otherwise:
  `@agent.tool_plain(metadata={"livingai": {"idempotent": True}})`.
- Tools run one at a time inside a step (the journal is keyed by order; parallel tools
  would take their order from the event loop's scheduling).
- A tool with `requires_approval=True` (a deferred tool) maps onto a durable wait: the run
  stops with the tool's call pending, the step waits for the event
  `approval:<tool name>` (`lai.send(execution_id, "approval:refund", {"approved": True})`,
  or `{"approved": False, "reason": "..."}`) without holding a worker, and once woken runs
  again from its start: the journal replays everything before the approval, and the agent
  goes on with the decision (a denial is told to the model, which answers without the tool).
- Outside a step the agent runs as it would without the capability: nothing is recorded.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from datetime import timedelta
from typing import Any, Generic, TypeVar

try:
    from pydantic_ai import Agent, DeferredToolRequests, DeferredToolResults, ToolDenied
    from pydantic_ai.agent import AgentRunResult
    from pydantic_ai.durable_exec import (
        JSON_CODEC,
        BaseDurabilityCapability,
        DurabilityEngineSpec,
        DurableOperationBackend,
        DurableOperationId,
        JournalCallableOperationBackend,
        ModelRequestId,
        RoleBasedOperationConfig,
        ToolsetCallToolId,
    )
    from pydantic_ai.messages import ModelMessage
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "livingai_tasks.adapters.pydantic_ai needs Pydantic AI (pydantic-ai-slim >= 2.68): "
        "pip install 'livingai-tasks[pydantic-ai]'") from exc

from ..celery_wing import context
from ..celery_wing.journal import acall
from ..celery_wing.waits import wait_for
from ..errors import ConfigError

__all__ = ["DurableAgent", "LivingAIDurability", "TOOL_CONFIG_KEY", "APPROVAL_EVENT_PREFIX"]

TOOL_CONFIG_KEY = "livingai"  # tool metadata key: {"livingai": {"idempotent": True}}
APPROVAL_EVENT_PREFIX = "approval:"  # the event a step waits for: approval:<tool name>
_Config = dict[str, Any]
DepsT = TypeVar("DepsT")
OutputT = TypeVar("OutputT")


def _in_step() -> bool:
    """Inside the body of a running step (the durable container): calls are journaled."""
    return context.current_execution_id() is not None


class _JournalBackend(JournalCallableOperationBackend[_Config]):
    """Runs each of Pydantic AI's durable units as a journaled call of the running step."""

    async def execute(self, *, operation_id: DurableOperationId, name: str,
                      body: Callable[[], Awaitable[object]], cache_key: tuple[object, ...],
                      config: _Config) -> object:
        if isinstance(operation_id, ModelRequestId):
            # The encoded ModelResponse carries its usage under Pydantic AI's names
            # (input_tokens, output_tokens), which the journal reads from result["usage"].
            return await acall(body, name=name, kind="model", model=operation_id.model_name)
        if isinstance(operation_id, ToolsetCallToolId):
            idempotent = (config or {}).get("idempotent", False)
            if not isinstance(idempotent, bool):
                raise ConfigError(f"Tool metadata {{{TOOL_CONFIG_KEY!r}: {{'idempotent': ...}}}} "
                                  f"takes True or False, got {idempotent!r} (unit {name!r}).")
            return await acall(body, name=name, kind="tool", idempotent=idempotent)
        # Argument validation, discovery, event handlers: deterministic or side-effect free
        # in the agents this adapter serves, so they run again on a re-run, unrecorded.
        return await body()


class LivingAIDurability(BaseDurabilityCapability[Any]):
    """Pydantic AI durability capability: an agent's model requests and tool calls become
    journaled calls of the step that runs it. Attach it with `Agent(...,
    capabilities=[LivingAIDurability()])` or let `DurableAgent` attach it per run. The agent
    needs a `name` (or pass `name=`): it prefixes every journaled call's name, which a
    re-run checks."""

    engine_spec = DurabilityEngineSpec(
        engine_name="livingai-tasks",
        durable_unit_noun="journaled call",
        durable_container_noun="step",
        codec=JSON_CODEC,  # the journal records JSON
        wrapped_toolset_kinds=frozenset({"function", "mcp", "dynamic"}),
        toolset_lifecycles={"function": "enter-always", "mcp": "enter-in-durable-unit",
                            "dynamic": "enter-never"},
        journal_discovery=False,
        sequential_tools_in_durable_context=True,
        unsupported_runtime_toolset_kinds=frozenset({"function", "mcp", "dynamic"}),
        tool_config_key=TOOL_CONFIG_KEY,
    )

    @property
    def in_durable_context(self) -> bool:
        return _in_step()

    def get_durable_operation_backend(self) -> DurableOperationBackend[Any]:
        empty: _Config = {}
        per_tool = self._build_resolve_tool_config(empty)  # reads metadata["livingai"]

        def resolve_tool(operation_id: DurableOperationId, tool: object | None,
                         tool_name: str) -> Any:
            return per_tool(tool, tool_name)  # type: ignore[arg-type]

        return _JournalBackend(
            agent_name=self.name, default_model_id=self.default_model_id,
            config=RoleBasedOperationConfig(model=empty, event=empty, capability=empty,
                                            tool=empty, resolve_tool=resolve_tool))


def _decision(payload: Any, tool: str) -> bool | ToolDenied:
    """An approval event's payload as Pydantic AI's decision."""
    if isinstance(payload, bool):
        return payload
    if isinstance(payload, dict) and isinstance(payload.get("approved"), bool):
        if payload["approved"]:
            return True
        return ToolDenied(str(payload.get("reason") or f"The call of {tool} was denied."))
    raise ConfigError(f"The approval event for tool {tool!r} carries {payload!r}; accepted: "
                      'true, false, {"approved": true} or {"approved": false, "reason": "..."}.')


class DurableAgent(Generic[DepsT, OutputT]):
    """Runs a Pydantic AI `Agent` inside an `@lai.agent_step` body with its model requests
    and tool calls journaled, and its approval-gated tools waiting durably.

    `approval_timeout`: how long a step waits for each approval (None: forever); past it,
    the step gets `lai.WaitTimeout`. Outside a step `run_sync` is the agent's own."""

    def __init__(self, agent: Agent[DepsT, OutputT], *, name: str | None = None,
                 approval_timeout: timedelta | float | None = None) -> None:
        if not isinstance(agent, Agent):
            raise ConfigError(f"DurableAgent wraps a pydantic_ai.Agent, got {agent!r}.")
        if not (name or agent.name):
            raise ConfigError("DurableAgent needs a name: give the Agent one (Agent(..., "
                              "name='support')) or pass name=; it prefixes the journaled "
                              "calls' names, which a re-run checks.")
        self.agent = agent
        self.name = name or agent.name
        self.approval_timeout = approval_timeout
        self._capability = LivingAIDurability(name=self.name)

    def run_sync(self, user_prompt: str | None = None, *,
                 message_history: Sequence[ModelMessage] | None = None,
                 deps: Any = None, **kwargs: Any) -> AgentRunResult[Any]:
        """`Agent.run_sync` with durability; approval-gated tools wait for their event
        (see the module docstring). Returns the last run's result; its `output` is the
        agent's output (or a `DeferredToolRequests` for tools deferred for outside
        execution, which this adapter leaves to the caller)."""
        if "capabilities" in kwargs:
            raise ConfigError("DurableAgent.run_sync adds its own capability; attach others "
                              "to the Agent itself.")
        output_type = kwargs.pop("output_type", None) or self.agent.output_type
        gated = _with_deferred(output_type)
        result = self.agent.run_sync(user_prompt, message_history=message_history, deps=deps,
                                     output_type=gated, capabilities=[self._capability],
                                     **kwargs)
        while isinstance(result.output, DeferredToolRequests) and result.output.approvals \
                and _in_step():
            decisions = DeferredToolResults()
            for call in result.output.approvals:
                got = wait_for(APPROVAL_EVENT_PREFIX + call.tool_name,
                               timeout=self.approval_timeout)
                decisions.approvals[call.tool_call_id] = _decision(got, call.tool_name)
            result = self.agent.run_sync(None, message_history=result.all_messages(),
                                         deps=deps, output_type=gated,
                                         deferred_tool_results=decisions,
                                         capabilities=[self._capability], **kwargs)
        return result


def _with_deferred(output_type: Any) -> Any:
    """The output types of a run that may stop on a tool awaiting approval."""
    if isinstance(output_type, Sequence) and not isinstance(output_type, str):
        types = list(output_type)
    else:
        types = [output_type]
    return types if DeferredToolRequests in types else [*types, DeferredToolRequests]
