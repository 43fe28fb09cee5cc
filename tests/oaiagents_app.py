"""Agent steps of the OpenAI Agents SDK adapter for the real-worker tests: loaded by the
fleet's workers with `--include tests.oaiagents_app`, on tests.agent_app's app (its
counters in Redis, its pause flags)."""

from __future__ import annotations

import os
from typing import Any

import agents

import livingai_tasks as lai
from livingai_tasks.adapters.openai_agents import run_durably
from tests.agent_app import _pause, app, count
from tests.oaiagents_fake import build_agent

os.environ.setdefault("OPENAI_API_KEY", "sk-test-dummy")  # never used: no request is made
agents.set_tracing_disabled(True)
PROMPT = "Refund my order, please."


@lai.agent_step(app)
def oai_support(order: str, label: str) -> dict[str, Any]:
    """Four model calls, an idempotent lookup, a non-idempotent refund, two notes."""
    result = run_durably(build_agent(label, count, _pause, order=order), PROMPT)
    return {"answer": result.final_output}


@lai.agent_step(app)
def oai_approval(order: str, label: str) -> dict[str, Any]:
    """The same agent, its refund needing approval (the step waits for it)."""
    agent = build_agent(label, count, _pause, order=order, refund_needs_approval=True)
    return {"answer": run_durably(agent, PROMPT).final_output}
