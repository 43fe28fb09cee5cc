"""The agents the journal benchmark runs inside its steps, each with or without journaling,
and the fake model they ask (no sleep, no network): the same work both ways, so the
difference is the journal's.

    core      a loop of `calls` model calls, each given the conversation so far (as a user
              of `lai.call(client.chat, messages, kind="model")` would pass it) and
              appending the reply; journaled: each through `lai.call(..., kind="model")`
    pydantic  a Pydantic AI `Agent` whose `FunctionModel` asks for an idempotent lookup
              tool `calls - 1` times and then answers: `calls` model requests and
              `calls - 1` tool calls; journaled: run through the adapter's `DurableAgent`

Each model call first calls `Probe.on_call(turn)`: the overhead run notes the time there,
the resume run counts the call in Redis and can block in it.
"""

from __future__ import annotations

import time
from typing import Any

import livingai_tasks as lai

from ..core.library import durable_agent

__all__ = ["AGENT_KINDS", "Probe", "run_agent", "prepare", "model_reply", "pydantic_available"]

AGENT_KINDS = ("core", "pydantic")
_MODEL = "fake-chat-1"


class Probe:
    """Called at the start of every model call, with its turn (from 0). The base notes the
    wall clock and the process's CPU time there; a subclass may do more."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def on_call(self, turn: int) -> None:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())


def model_reply(messages: list[dict[str, Any]], turn: int) -> dict[str, Any]:
    """The fake model: a reply the size of a short assistant turn, with token usage (which
    the journal records) and a model name. Deterministic, so every run's output matches."""
    prompt_tokens = sum(len(m["content"]) for m in messages) // 4
    text = (f"Turn {turn}: checked order A-{100 + turn}; it shipped on day {turn % 28 + 1} "
            "and the customer was told. " * 3)
    return {"model": _MODEL, "content": text,
            "usage": {"input_tokens": prompt_tokens, "output_tokens": len(text) // 4}}


def _core(calls: int, journaled: bool, probe: Probe) -> str:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "Check the last orders."}]

    def chat(history: list[dict[str, Any]], turn: int) -> dict[str, Any]:
        probe.on_call(turn)
        return model_reply(history, turn)

    for turn in range(calls):
        if journaled:
            reply = lai.call(chat, messages, turn, kind="model", name="fake.chat")
        else:
            reply = chat(messages, turn)
        messages.append({"role": "assistant", "content": reply["content"]})
    return f"{len(messages) - 1} replies, last: {messages[-1]['content'][:40]}"


def pydantic_available() -> bool:
    try:
        import pydantic_ai  # noqa: F401
    except ImportError:
        return False
    return True


class _Pydantic:
    """One Pydantic AI agent per process, built on first use (Pydantic AI is imported only
    then), and its DurableAgent. The number of calls and the probe of a run are read from
    this object, which the model function and the run share."""

    def __init__(self) -> None:
        from pydantic_ai import Agent
        from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
        from pydantic_ai.models.function import AgentInfo, FunctionModel

        self.calls = 1
        self.probe = Probe()

        def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
            turn = sum(isinstance(m, ModelResponse) for m in messages)
            self.probe.on_call(turn)
            if turn < self.calls - 1:
                return ModelResponse(parts=[ToolCallPart(
                    "lookup", {"order": f"A-{100 + turn}"}, tool_call_id=f"call-{turn}")])
            return ModelResponse(parts=[TextPart(f"{turn} lookups done")])

        self.agent: Any = Agent(FunctionModel(respond, model_name=_MODEL), name="orders")

        # Read-only, so idempotent: recorded write-behind, as a model request is.
        @self.agent.tool_plain(metadata={"livingai": {"idempotent": True}})
        def lookup(order: str) -> str:
            return f"order {order} shipped"

        self.durable = durable_agent(self.agent)

    def run(self, calls: int, journaled: bool, probe: Probe) -> str:
        self.calls, self.probe = calls, probe
        runner = self.durable if journaled else self.agent
        return str(runner.run_sync("Check the last orders.").output)


_pydantic: _Pydantic | None = None


def _pydantic_agent() -> _Pydantic:
    global _pydantic
    if _pydantic is None:
        _pydantic = _Pydantic()
    return _pydantic


def prepare(kinds: list[str]) -> None:
    """Build the agents of `kinds` now (a worker does it as it loads the app, before its
    pool forks, as an app that defines its agents at import would): not in a timed run."""
    if "pydantic" in kinds:
        _pydantic_agent()


def run_agent(kind: str, calls: int, journaled: bool, probe: Probe | None = None) -> str:
    """Run the agent of `kind` for `calls` model calls; its output (the same either way)."""
    probe = probe or Probe()
    if kind == "core":
        return _core(calls, journaled, probe)
    if kind == "pydantic":
        return _pydantic_agent().run(calls, journaled, probe)
    raise ValueError(f"agent kind must be one of {', '.join(AGENT_KINDS)}, got {kind!r}.")
