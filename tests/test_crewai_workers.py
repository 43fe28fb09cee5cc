"""The CrewAI adapter on real worker processes (Redis broker, PostgreSQL store): the worker's
process group is SIGKILLed inside a crew run after its non-idempotent tool's effect, another
worker and beat resume it, and the counts of the scripted model and the tools (kept in
Redis, outside the store) say what really ran again."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .tools import import_crewai_or_skip

import_crewai_or_skip()  # before anything imports CrewAI (its telemetry off first)

import livingai_tasks as lai  # noqa: E402
from livingai_tasks import ExecutionStatus  # noqa: E402
from livingai_tasks.adapters.crewai import approve_tool_call  # noqa: E402
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

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300),
              pytest.mark.filterwarnings("ignore::DeprecationWarning:crewai.*")]
INCLUDE = ("--include", "tests.crewai_app")


@pytest.fixture
def crew_fleet(request: Any, tmp_path: Path) -> Iterator[Fleet]:
    fleet = make_fleet(tmp_path, fleet_store_url(request, "postgres"))
    yield fleet
    fleet.close()
    lai_runtime.get().close()


def test_killed_after_the_refund_resumes_without_repeating_recorded_calls(
        crew_fleet: Fleet) -> None:
    from tests.crewai_app import crew_support

    fleet = crew_fleet
    w1 = fleet.worker("w1", extra=INCLUDE)
    calm = lai.start(crew_support.s("o1", "calm"))
    wait_status(fleet, calm.execution_id, ExecutionStatus.COMPLETED)
    expected = step_node(calm.execution_id).output
    tokens = token_totals(store().nodes(calm.execution_id))
    assert expected["answer"].startswith("done: ") and expected["tokens"] == 452
    assert tokens["calls"] == 4 and tokens["total_tokens"] == 452

    fleet.pause("storm:model:3")  # the last model call: after the refund and the note
    run = lai.start(crew_support.s("o1", "storm"))
    wait_for(lambda: fleet.count("storm:model:3") == 1, 60, "the call after the refund")
    os.killpg(w1.pid, signal.SIGKILL)  # the worker and its pool child, nothing recorded
    w1.popen.wait(10)
    fleet.unpause("storm:model:3")
    assert fleet.count("storm:refund") == 1
    fleet.worker("w2", extra=INCLUDE)
    fleet.beat()
    wait_status(fleet, run.execution_id, ExecutionStatus.COMPLETED)
    # the tools' effects happened once; recorded model calls were not repeated, the one
    # killed mid-call ran again
    assert [fleet.count(f"storm:{t}") for t in ("lookup", "refund", "note")] == [1, 1, 1]
    assert [fleet.count(f"storm:model:{t}") for t in range(4)] == [1, 1, 1, 2]
    step = step_node(run.execution_id)
    assert step.output == expected
    assert step.metadata["attempt"] == 2
    assert token_totals(store().nodes(run.execution_id)) == tokens  # counted once


def test_a_tool_needing_approval_waits_and_runs_once_approved(crew_fleet: Fleet) -> None:
    from tests.crewai_app import crew_approval

    fleet = crew_fleet
    fleet.worker("w1", extra=INCLUDE)
    run = lai.start(crew_approval.s("o1", "gate"))
    wait_status(fleet, run.execution_id, ExecutionStatus.WAITING)
    assert [fleet.count(f"gate:model:{t}") for t in range(2)] == [1, 1]
    assert fleet.count("gate:refund") == 0 and fleet.count("gate:model:2") == 0
    assert approve_tool_call(run.execution_id, "refund", by="alice") is True
    wait_status(fleet, run.execution_id, ExecutionStatus.COMPLETED)
    # the woken step replayed the calls before the approval and ran the refund once
    assert fleet.count("gate:refund") == 1 and fleet.count("gate:lookup") == 1
    assert [fleet.count(f"gate:model:{t}") for t in range(4)] == [1, 1, 1, 1]
    assert run.get(timeout=40)["answer"].startswith('done: ["order o1: 42 EUR"')
