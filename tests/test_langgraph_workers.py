"""A LangGraph agent on real worker processes (Redis broker; PostgreSQL and Redis stores):
the worker's process group is SIGKILLed after the refund tool's effect, before the run
ends; another worker and beat resume it. The fake model and the tool count their real calls
in Redis, outside our stores."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langgraph")

import livingai_tasks as lai  # noqa: E402
from livingai_tasks import ExecutionStatus  # noqa: E402
from livingai_tasks.adapters.langgraph import INTERRUPT_EVENT  # noqa: E402
from livingai_tasks.celery_wing import runtime as lai_runtime  # noqa: E402
from livingai_tasks.journal import token_totals  # noqa: E402

from .fleet import (  # noqa: E402
    Fleet,
    fleet_store_url,
    make_fleet,
    step_node,
    store,
    wait_for,
    wait_status,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]
INCLUDE = ("--include", "tests.langgraph_app")


@pytest.fixture(params=["postgres", "redis"])
def lg_fleet(request: Any, tmp_path: Path) -> Iterator[Fleet]:
    url = fleet_store_url(request, request.param)
    fleet = make_fleet(tmp_path, url)
    import tests.langgraph_app  # noqa: F401  (the test process publishes its steps)
    yield fleet
    fleet.close()
    lai_runtime.get().close()


def test_killed_after_the_refund_resumes_without_repeating_finished_nodes(
        lg_fleet: Fleet) -> None:
    from tests.langgraph_app import langgraph_agent

    fleet = lg_fleet
    w1 = fleet.worker("w1", extra=INCLUDE)
    calm = lai.start(langgraph_agent.s("refund me", "calm"))
    wait_status(fleet, calm.execution_id, ExecutionStatus.COMPLETED)
    assert [fleet.count(f"calm:model:{t}") for t in range(3)] == [1, 1, 1]
    expected = step_node(calm.execution_id).output
    tokens = token_totals(store().nodes(calm.execution_id))
    assert tokens["calls"] == 3

    fleet.pause("storm:model:1")  # the model call after the refund's effect
    run = lai.start(langgraph_agent.s("refund me", "storm"))
    wait_for(lambda: fleet.count("storm:model:1") == 1, 30, "the model call after the refund")
    w1.kill_group()
    fleet.unpause("storm:model:1")
    assert fleet.count("storm:refund") == 1
    fleet.worker("w2", extra=INCLUDE)
    fleet.beat()
    wait_status(fleet, run.execution_id, ExecutionStatus.COMPLETED)
    assert fleet.count("storm:refund") == 1  # the tool's effect happened once
    # the finished nodes were not run again; the model call killed mid-way ran again
    assert [fleet.count(f"storm:model:{t}") for t in range(3)] == [1, 2, 1]
    step = step_node(run.execution_id)
    assert step.metadata["attempt"] == 2
    calm_out = {**expected, "run": "storm"}
    out = step.output
    # the tool message carries the refund's idempotency key, which differs per execution
    assert [m for i, m in enumerate(out["messages"]) if i != 2] == \
        [m for i, m in enumerate(calm_out["messages"]) if i != 2]
    assert json.loads(out["messages"][2][1])["refunded"] == 42
    assert token_totals(store().nodes(run.execution_id)) == tokens  # counted once


def test_killed_inside_the_refund_node_holds_the_step_in_doubt(lg_fleet: Fleet) -> None:
    from tests.langgraph_app import langgraph_agent

    fleet = lg_fleet
    fleet.pause("doubt:refund")
    w1 = fleet.worker("w1", extra=INCLUDE)
    run = lai.start(langgraph_agent.s("refund me", "doubt"))
    wait_for(lambda: fleet.count("doubt:refund") == 1, 30, "the refund to start")
    w1.kill_group()
    fleet.unpause("doubt:refund")
    fleet.worker("w2", extra=INCLUDE)
    fleet.beat()
    wait_status(fleet, run.execution_id, ExecutionStatus.IN_DOUBT)
    assert fleet.count("doubt:refund") == 1
    assert [fleet.count(f"doubt:model:{t}") for t in range(3)] == [1, 0, 0]


def test_an_interrupt_waits_durably_and_resumes_with_the_answer_sent(
        lg_fleet: Fleet) -> None:
    from tests.langgraph_app import langgraph_asking

    fleet = lg_fleet
    fleet.worker("w1", extra=INCLUDE)
    run = lai.start(langgraph_asking.s("refund me", "ask"))
    wait_status(fleet, run.execution_id, ExecutionStatus.WAITING)
    assert fleet.count("ask:refund") == 0 and fleet.count("ask:model:0") == 1
    assert lai.send(run.execution_id, INTERRUPT_EVENT, "yes", key="k1") is True
    wait_status(fleet, run.execution_id, ExecutionStatus.COMPLETED)
    out = step_node(run.execution_id).output
    assert json.loads(out["messages"][2][1])["refunded"] == 42
    assert fleet.count("ask:refund") == 1  # once, after the answer
    # the model call before the interrupt was not made again when the step was woken
    assert [fleet.count(f"ask:model:{t}") for t in range(3)] == [1, 1, 1]
    assert token_totals(store().nodes(run.execution_id))["calls"] == 3
