"""The OpenAI Agents SDK integration points the adapter uses: a Model and a ModelProvider
that journal every response, FunctionTools whose invocations are journaled, and clones of
an agent graph (handoffs, agents as tools) carrying both. The user's agents are not
changed."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from agents import (
    Agent,
    FunctionTool,
    Handoff,
    Model,
    ModelProvider,
    ModelResponse,
    ModelSettings,
    ModelTracing,
    MultiProvider,
    RunConfig,
    RunContextWrapper,
)
from agents.agent_output import AgentOutputSchemaBase
from agents.items import TResponseInputItem, TResponseStreamEvent
from agents.tool import (
    CodeInterpreterTool,
    FileSearchTool,
    HostedMCPTool,
    ImageGenerationTool,
    Tool,
    ToolSearchTool,
    WebSearchTool,
)
from agents.tool_context import ToolContext
from openai.types.responses.response_prompt_param import ResponsePromptParam

from ...errors import ConfigError
from .journal import (
    journaled,
    response_from_json,
    response_to_json,
    tool_result_from_json,
    tool_result_to_json,
)

__all__ = ["JournaledModel", "JournaledModelProvider", "idempotent", "durable_agent",
           "durable_run_config"]

# Tools the model provider runs on its side: their work comes back inside the model
# response, which is journaled. Other non-function tools run locally with no journal.
_HOSTED = (FileSearchTool, WebSearchTool, HostedMCPTool, ImageGenerationTool,
           CodeInterpreterTool, ToolSearchTool)
_IDEMPOTENT = "_livingai_idempotent"


def _usage(result: dict[str, Any]) -> Any:
    return result["usage"]


# -- models ---------------------------------------------------------------------------------

class JournaledModel(Model):
    """A Model whose every response is a journaled call (kind "model", idempotent: a
    response lost in a crash is asked for again), recorded as JSON with its token usage."""

    def __init__(self, inner: Model, model_name: str | None = None) -> None:
        self.inner: Model = inner.inner if isinstance(inner, JournaledModel) else inner
        self.model_name = model_name or str(getattr(inner, "model", None)
                                            or type(inner).__name__)

    async def get_response(
        self, system_instructions: str | None, input: str | list[TResponseInputItem],
        model_settings: ModelSettings, tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None, handoffs: list[Handoff],
        tracing: ModelTracing, *, previous_response_id: str | None,
        conversation_id: str | None, prompt: ResponsePromptParam | None,
    ) -> ModelResponse:
        retry = model_settings.retry
        if retry is not None and (retry.max_retries or 0) > 0:
            # Each attempt would be a call of its own: a re-run would run the failed one
            # again and then meet the retry's record where the next call's belongs.
            raise ConfigError(
                f"ModelSettings.retry.max_retries={retry.max_retries!r} on model "
                f"{self.model_name!r}: run_durably journals each model request, so leave the "
                "SDK's runner retries off (the client's own retries, inside one request, "
                "are fine; a failed request fails the step, which Celery may retry).")

        def ask() -> Awaitable[ModelResponse]:
            return self.inner.get_response(
                system_instructions, input, model_settings, tools, output_schema, handoffs,
                tracing, previous_response_id=previous_response_id,
                conversation_id=conversation_id, prompt=prompt)

        # What the record shows of the request (replay never reads it).
        request = {"system_instructions": system_instructions, "input": input,
                   "tools": [getattr(t, "name", type(t).__name__) for t in tools],
                   "handoffs": [h.tool_name for h in handoffs],
                   "previous_response_id": previous_response_id}
        recorded = await journaled(ask, response_to_json, request,
                                    name=f"model:{self.model_name}", kind="model",
                                    model=self.model_name, usage=_usage)
        return response_from_json(recorded)

    def stream_response(
        self, system_instructions: str | None, input: str | list[TResponseInputItem],
        model_settings: ModelSettings, tools: list[Tool],
        output_schema: AgentOutputSchemaBase | None, handoffs: list[Handoff],
        tracing: ModelTracing, *, previous_response_id: str | None,
        conversation_id: str | None, prompt: ResponsePromptParam | None,
    ) -> AsyncIterator[TResponseStreamEvent]:
        raise ConfigError("livingai_tasks.adapters.openai_agents journals whole responses: "
                          "run the agent with run_durably() (Runner.run), not "
                          "Runner.run_streamed.")

    async def close(self) -> None:
        await self.inner.close()

    def get_retry_advice(self, request: Any) -> Any:
        return self.inner.get_retry_advice(request)


class JournaledModelProvider(ModelProvider):
    """Wraps a ModelProvider (default: the SDK's MultiProvider) so every model it hands out
    is a JournaledModel named after the model name asked for."""

    def __init__(self, inner: ModelProvider | None = None) -> None:
        if isinstance(inner, JournaledModelProvider):
            inner = inner.inner
        self.inner: ModelProvider = inner if inner is not None else MultiProvider()

    def get_model(self, model_name: str | None) -> Model:
        return JournaledModel(self.inner.get_model(model_name), model_name or "default")

    async def aclose(self) -> None:
        await self.inner.aclose()


# -- tools ----------------------------------------------------------------------------------

def idempotent(tool: FunctionTool) -> FunctionTool:
    """Mark a function tool safe to run twice: a crash during it runs it again on the re-run
    instead of holding the step IN_DOUBT. Tools are non-idempotent unless marked."""
    if not isinstance(tool, FunctionTool):
        raise ConfigError(f"idempotent() marks a FunctionTool (@function_tool), got {tool!r}.")
    setattr(tool, _IDEMPOTENT, True)
    return tool


class _JournaledInvoker:
    """A FunctionTool's on_invoke_tool whose every invocation is a journaled call."""

    def __init__(self, inner: Callable[..., Awaitable[Any]], name: str, safe: bool) -> None:
        self.inner = inner
        self.name = name
        self.safe = safe

    async def __call__(self, ctx: ToolContext[Any], input: str) -> Any:
        request = {"tool": self.name, "arguments": input,
                   "call_id": getattr(ctx, "tool_call_id", None)}
        recorded = await journaled(lambda: self.inner(ctx, input), tool_result_to_json,
                                    request, name=f"tool:{self.name}", kind="tool",
                                    idempotent=self.safe)
        return tool_result_from_json(recorded)

    def __agents_bind_function_tool__(self, tool: FunctionTool) -> _JournaledInvoker:
        # The SDK rebinds an invoker to each copy of its tool (its failure policy is the
        # copy's): keep journaling around the rebound one.
        bind = getattr(self.inner, "__agents_bind_function_tool__", None)
        inner = bind(tool) if callable(bind) else self.inner
        return self if inner is self.inner else _JournaledInvoker(inner, self.name, self.safe)

    def __getattr__(self, name: str) -> Any:  # prepare_arguments, markers: the inner's
        inner = self.__dict__.get("inner")  # absent while copy/deepcopy rebuild this object
        if inner is None:
            raise AttributeError(name)
        return getattr(inner, name)


def _durable_tool(tool: Any) -> Any:
    if isinstance(tool, FunctionTool):
        if isinstance(tool.on_invoke_tool, _JournaledInvoker):
            return tool
        # An agent used as a tool is one journaled call: its own model calls are part of
        # its result (journal.py runs calls nested in a call unjournaled).
        clone = copy.copy(tool)
        clone.on_invoke_tool = _JournaledInvoker(
            tool.on_invoke_tool, tool.name, bool(getattr(tool, _IDEMPOTENT, False)))
        return clone
    if isinstance(tool, _HOSTED):
        return tool
    raise ConfigError(
        f"Tool {getattr(tool, 'name', tool)!r} ({type(tool).__name__}) runs locally outside "
        "the journal, so a re-run would run it again: run_durably journals FunctionTools "
        "(@function_tool) and passes the provider's hosted tools through. Wrap its work in "
        "a @function_tool.")


def _durable_handoff(handoff: Handoff[Any, Any], memo: dict[int, Any]) -> Handoff[Any, Any]:
    invoke = handoff.on_invoke_handoff

    async def on_invoke_handoff(ctx: RunContextWrapper[Any], args: str) -> Any:
        return durable_agent(await invoke(ctx, args), _memo=memo)

    return dataclasses.replace(handoff, on_invoke_handoff=on_invoke_handoff)


def durable_agent(agent: Agent[Any], *, _memo: dict[int, Any] | None = None) -> Agent[Any]:
    """A clone of `agent` (and of every agent it hands off to) whose model, when it is a
    Model instance, is journaled and whose function tools are journaled. ConfigError for
    what cannot be journaled (local non-function tools, MCP servers)."""
    if not isinstance(agent, Agent):
        raise ConfigError(f"run_durably() runs an agents.Agent, got {agent!r}.")
    memo = {} if _memo is None else _memo
    if id(agent) in memo:
        return memo[id(agent)]  # type: ignore[no-any-return]
    if agent.mcp_servers:
        raise ConfigError(
            f"Agent {agent.name!r} has MCP servers: their tools are listed at run time and "
            "would not be journaled. Use HostedMCPTool, or expose them as @function_tools.")
    clone = agent.clone(tools=[], handoffs=[])
    memo[id(agent)] = clone
    clone.tools = [_durable_tool(t) for t in agent.tools]
    clone.handoffs = [durable_agent(h, _memo=memo) if isinstance(h, Agent)
                      else _durable_handoff(h, memo) for h in agent.handoffs]
    if isinstance(agent.model, Model):
        clone.model = JournaledModel(agent.model)
    return clone


def durable_run_config(run_config: RunConfig | None = None) -> RunConfig:
    """A copy of `run_config` whose models are journaled (its provider wrapped, its `model`
    too when it is a Model instance)."""
    config = run_config if run_config is not None else RunConfig()
    model = config.model
    return dataclasses.replace(
        config, model_provider=JournaledModelProvider(config.model_provider),
        model=JournaledModel(model) if isinstance(model, Model) else model)


