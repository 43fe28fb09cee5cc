"""The LangGraph agent steps the real-worker tests run (test_langgraph_workers.py): loaded
into tests.agent_app's workers with `--include tests.langgraph_app`, on its app, counters
and pause flags. The fake model and the refund count their real calls in Redis."""

from __future__ import annotations

from typing import Any

import livingai_tasks as lai
from livingai_tasks.adapters.langgraph import run_graph
from tests import agent_app
from tests.agent_app import app

from .langgraph_agent import as_json, build, start_state


def on_model(run: str, turn: int) -> None:
    agent_app.count(f"{run}:model")
    agent_app.count(f"{run}:model:{turn}")
    agent_app._pause(f"{run}:model:{turn}")


def on_refund(run: str, amount: int) -> dict[str, Any]:
    agent_app.count(f"{run}:refund")
    agent_app.count(f"refund_key:{lai.idempotency_key()}")
    agent_app._pause(f"{run}:refund")
    return {"refunded": amount, "key": lai.idempotency_key()}


GRAPH = build(on_model, on_refund)
ASKING = build(on_model, on_refund, ask_first=True)


@lai.agent_step(app)
def langgraph_agent(topic: str, run: str) -> dict[str, Any]:
    """A LangGraph agent: model, refund tool, model, summarizing model; all in one step."""
    return as_json(run_graph(GRAPH, start_state(topic, run)))


@lai.agent_step(app)
def langgraph_asking(topic: str, run: str) -> dict[str, Any]:
    """The same agent, whose tool node asks a person (interrupt) before refunding."""
    return as_json(run_graph(ASKING, start_state(topic, run)))
