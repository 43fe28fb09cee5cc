"""The Pydantic AI adapter on real worker processes (Redis broker): the worker's whole
process group is SIGKILLed inside an agent run after its non-idempotent tool's effect,
another worker and beat resume it, and the counts of the fake model and the tools (kept in
Redis, outside our stores) say what really ran again. On the PostgreSQL store and on the
Redis store. Also: a tool with requires_approval=True waits durably for its approval event.
The agents are in tests/pyai_app.py."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("pydantic_ai")

import livingai_tasks as lai  # noqa: E402
from livingai_tasks import ExecutionStatus  # noqa: E402
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
WITH_AGENTS = ("-I", "tests.pyai_app")  # the workers load the Pydantic AI agents too
EXPECTED = "done: ['order A-17 is paid', {'refunded': 42, 'order': 'A-17'}, 'order A-18 is paid']"


@pytest.fixture(params=["postgres", "redis"])
def pyai_fleet(request: Any, tmp_path: Path) -> Iterator[Fleet]:
    url = fleet_store_url(request, request.param)
    fleet = make_fleet(tmp_path, url)
    yield fleet
    fleet.close()
    lai_runtime.get().close()


def test_killed_after_the_refund_resumes_without_repeating_recorded_calls(
        pyai_fleet: Fleet) -> None:
    from tests.pyai_app import pyai_refunds

    fleet = pyai_fleet
    w1 = fleet.worker("w1", extra=WITH_AGENTS)
    calm = lai.start(pyai_refunds.s("calm"))
    wait_status(fleet, calm.execution_id, ExecutionStatus.COMPLETED)
    assert step_node(calm.execution_id).output == EXPECTED
    assert fleet.count("calm:model") == 4 and fleet.count("calm:refund") == 1
    tokens = token_totals(store().nodes(calm.execution_id))
    assert tokens["calls"] == 4 and tokens["total_tokens"] > 0

    fleet.pause("storm:model:2")  # the model request after the refund's effect
    run = lai.start(pyai_refunds.s("storm"))
    wait_for(lambda: fleet.count("storm:model:2") == 1, 30, "the request after the refund")
    w1.kill_group()
    fleet.unpause("storm:model:2")
    assert fleet.count("storm:refund") == 1
    fleet.worker("w2", extra=WITH_AGENTS)
    fleet.beat()
    wait_status(fleet, run.execution_id, ExecutionStatus.COMPLETED)
    assert fleet.count("storm:refund") == 1  # the tool's effect happened once
    # recorded model requests were not repeated; the one killed mid-request ran again
    assert [fleet.count(f"storm:model:{t}") for t in range(4)] == [1, 1, 2, 1]
    step = step_node(run.execution_id)
    assert step.output == EXPECTED and step.metadata["attempt"] == 2  # as the uncrashed run
    assert token_totals(store().nodes(run.execution_id)) == tokens  # tokens counted once


def test_killed_inside_the_refund_holds_the_step_in_doubt(pyai_fleet: Fleet) -> None:
    from tests.pyai_app import pyai_refunds

    fleet = pyai_fleet
    fleet.pause("doubt:refund")
    w1 = fleet.worker("w1", extra=WITH_AGENTS)
    run = lai.start(pyai_refunds.s("doubt"))
    wait_for(lambda: fleet.count("doubt:refund") == 1, 30, "the refund to start")
    w1.kill_group()
    fleet.unpause("doubt:refund")
    fleet.worker("w2", extra=WITH_AGENTS)
    fleet.beat()
    wait_status(fleet, run.execution_id, ExecutionStatus.IN_DOUBT)
    assert fleet.count("doubt:refund") == 1  # never run twice
    assert [fleet.count(f"doubt:model:{t}") for t in range(3)] == [1, 1, 0]
    assert "call_tool:refund" in store().get_execution(run.execution_id).reason


def test_a_tool_needing_approval_waits_durably_and_runs_once_approved(fleet: Fleet) -> None:
    from tests.pyai_app import pyai_wires

    fleet.worker("w1", extra=WITH_AGENTS)
    run = lai.start(pyai_wires.s("gate"))
    wait_status(fleet, run.execution_id, ExecutionStatus.WAITING)
    assert fleet.count("gate:model") == 1 and fleet.count("gate:wire") == 0
    assert "approval:wire" in str(store().get_execution(run.execution_id).reason)
    assert lai.send(run.execution_id, "approval:wire", {"approved": True}, key="k1") is True
    assert run.get(timeout=40) == "done: ['wired 7 to ACME']"
    assert fleet.count("gate:wire") == 1
    assert [fleet.count(f"gate:model:{t}") for t in range(2)] == [1, 1]  # replayed, not re-asked


def test_a_denied_tool_is_told_to_the_model_and_never_runs(fleet: Fleet) -> None:
    from tests.pyai_app import pyai_wires

    fleet.worker("w1", extra=WITH_AGENTS)
    run = lai.start(pyai_wires.s("nope"))
    wait_status(fleet, run.execution_id, ExecutionStatus.WAITING)
    lai.send(run.execution_id, "approval:wire", {"approved": False, "reason": "over budget"},
             key="k1")
    assert run.get(timeout=40) == "done: ['over budget']"
    assert fleet.count("nope:wire") == 0
