"""Pydantic AI agents on the real-worker fleet (test_pydantic_ai_workers.py): workers load
this module beside tests.agent_app (`celery worker -I tests.pyai_app`).

The model is a FunctionModel scripted by turn (the number of responses already in the
conversation) that counts each call in Redis, per run label and turn, and can be paused
there; the tools count their effects in Redis too. No network, no API key."""

from __future__ import annotations

from typing import Any

from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

import livingai_tasks as lai
from livingai_tasks.adapters.pydantic_ai import DurableAgent
from tests import agent_app

# What the model asks for at each turn; the last turn answers with the tools' results.
SCRIPTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "refunds": [("lookup", {"order": "A-17"}), ("refund", {"order": "A-17", "amount": 42}),
                ("lookup", {"order": "A-18"})],
    "wires": [("wire", {"to": "ACME", "amount": 7})],
}


def _label(messages: list[ModelMessage]) -> str:
    """The run label: the first word of the user's first prompt."""
    for message in messages:
        if isinstance(message, ModelRequest):
            for part in message.parts:
                if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                    return part.content.split()[0]
    return "?"


def _script_model(script: str) -> FunctionModel:
    steps = SCRIPTS[script]

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        label = _label(messages)
        turn = sum(isinstance(m, ModelResponse) for m in messages)
        agent_app.count(f"{label}:model")
        agent_app.count(f"{label}:model:{turn}")
        agent_app._pause(f"{label}:model:{turn}")
        if turn < len(steps):
            tool, args = steps[turn]
            return ModelResponse(parts=[ToolCallPart(tool, args, tool_call_id=f"call-{turn}")])
        returns = [part.content for m in messages if isinstance(m, ModelRequest)
                   for part in m.parts if part.part_kind == "tool-return"]
        return ModelResponse(parts=[TextPart(f"done: {returns}")])

    return FunctionModel(respond, model_name=f"scripted-{script}")


refunds_agent = Agent(_script_model("refunds"), name="refunds", deps_type=str)


@refunds_agent.tool_plain(metadata={"livingai": {"idempotent": True}})
def lookup(order: str) -> str:
    """Read-only: safe to run twice."""
    return f"order {order} is paid"


@refunds_agent.tool
def refund(ctx: RunContext[str], order: str, amount: int) -> dict[str, Any]:
    """Non-idempotent: each call is a real effect, counted."""
    agent_app.count(f"{ctx.deps}:refund")
    agent_app._pause(f"{ctx.deps}:refund")
    return {"refunded": amount, "order": order}


wires_agent = Agent(_script_model("wires"), name="wires", deps_type=str)


@wires_agent.tool(requires_approval=True)
def wire(ctx: RunContext[str], to: str, amount: int) -> str:
    agent_app.count(f"{ctx.deps}:wire")
    return f"wired {amount} to {to}"


durable_refunds = DurableAgent(refunds_agent)
durable_wires = DurableAgent(wires_agent)


@lai.agent_step(agent_app.app)
def pyai_refunds(label: str) -> str:
    """A Pydantic AI agent: four model requests, a read-only tool twice, a refund once."""
    return str(durable_refunds.run_sync(f"{label} please refund order A-17",
                                        deps=label).output)


@lai.agent_step(agent_app.app)
def pyai_wires(label: str) -> str:
    """A Pydantic AI agent whose tool needs approval: the step waits for it durably."""
    return str(durable_wires.run_sync(f"{label} wire 7 to ACME", deps=label).output)
