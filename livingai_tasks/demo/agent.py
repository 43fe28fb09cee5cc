"""The example agent's steps, as shared Celery tasks (any app that imports this module and
calls livingai_tasks.install() runs them), and `make_app()` for a Celery app configured from
the environment (demo/app.py is the module workers point `celery -A` at).

    LIVINGAI_BROKER    broker URL     (default: the embedded SQLite broker of the demo)
    LIVINGAI_BACKEND   result backend (default: db+sqlite:///livingai-results.db)
    LIVINGAI_STORE     our store      (see livingai_tasks.settings)
    LIVINGAI_QUEUE     the queue steps and the recovery task go to (default: celery)
    LIVINGAI_DEMO_STEP_S   how long each step "thinks" (default 0.6)
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, chain

import livingai_tasks as lai

from .ledger import ledger

__all__ = ["make_app", "agent_run", "plan", "search", "charge_card", "summarize"]

DEFAULT_BROKER = "sqla+sqlite:///livingai-broker.db"
DEFAULT_BACKEND = "db+sqlite:///livingai-results.db"


def _think(factor: float = 1.0) -> None:
    time.sleep(float(os.environ.get("LIVINGAI_DEMO_STEP_S", "0.6")) * factor)


@lai.agent_step(name="example.plan")
def plan(goal: str) -> dict[str, Any]:
    """The 'LLM' plans: a deterministic plan, no model needed."""
    _think()
    return {"goal": goal, "queries": [f"{goal} options", f"{goal} prices"]}


@lai.tool_step(name="example.search", idempotent=True)
def search(planned: dict[str, Any]) -> dict[str, Any]:
    """A read-only tool: safe to run again, so declared idempotent. Checkpoints per query so
    a re-run after a crash continues from the last finished query."""
    state = lai.last_state() or {"hits": []}
    for query in planned["queries"][len(state["hits"]):]:
        _think(0.5)
        state["hits"].append({"query": query, "top": f"best result for {query!r}"})
        lai.checkpoint(state)
    return {**planned, "hits": state["hits"]}


def _charged_already(key: str, found: dict[str, Any]) -> lai.Reconciled:
    """Ask the payment provider whether a charge with this idempotency key went through."""
    charge_id = ledger().find(key)
    if charge_id is None:
        return lai.Reconciled(done=False)
    return lai.Reconciled(done=True, output={**found, "charge_id": charge_id, "amount_cents": 4200})


@lai.tool_step(name="example.charge_card", reconcile=_charged_already)
def charge_card(found: dict[str, Any]) -> dict[str, Any]:
    """A side effect that must happen once: not idempotent. If its worker dies mid-charge,
    recovery asks the provider (reconcile) instead of charging again."""
    execution_id = lai.current_execution_id() or "unknown"
    charge_id = ledger().charge(lai.idempotency_key(), execution_id, 4200)
    _think(0.5)  # the provider's answer takes a while: a crash here leaves the outcome unknown
    return {**found, "charge_id": charge_id, "amount_cents": 4200}


@lai.agent_step(name="example.summarize")
def summarize(result: dict[str, Any]) -> str:
    _think()
    amount = result["amount_cents"] / 100
    return f"{result['goal']}: charged {amount:.2f} (charge #{result['charge_id']})"


def agent_run(goal: str) -> Any:
    """The example agent as one Celery canvas."""
    return chain(plan.s(goal), search.s(), charge_card.s(), summarize.s())


def make_app(name: str = "example_agent") -> Celery:
    app = Celery(name, broker=os.environ.get("LIVINGAI_BROKER", DEFAULT_BROKER),
                 backend=os.environ.get("LIVINGAI_BACKEND", DEFAULT_BACKEND))
    app.conf.update(
        broker_connection_retry_on_startup=True,
        broker_polling_interval=0.1,  # the embedded SQLite broker polls
        task_default_queue=os.environ.get("LIVINGAI_QUEUE", "celery"),
        worker_hijack_root_logger=False,
    )
    lai.install(app)
    return app

