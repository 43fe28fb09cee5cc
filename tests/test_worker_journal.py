"""Journaled calls on real worker processes: the worker's whole process group is SIGKILLed
inside an agent step that makes model calls and a non-idempotent tool call, another worker
and beat resume it, and the counts of the fake model and the tool (kept in Redis, outside
our stores) say what really ran again. On the Redis store and on PostgreSQL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import livingai_tasks as lai
from livingai_tasks import ExecutionStatus, Status
from livingai_tasks.celery_wing import runtime as lai_runtime
from livingai_tasks.journal import call_node_id, token_totals

from .fleet import (
    ROOT,
    Fleet,
    fleet_store_url,
    make_fleet,
    step_node,
    store,
    wait_for,
    wait_status,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture(params=["redis", "postgres"])
def journal_fleet(request: Any, tmp_path: Path) -> Iterator[tuple[Fleet, str]]:
    url = fleet_store_url(request, request.param)
    fleet = make_fleet(tmp_path, url)
    yield fleet, url
    fleet.close()
    lai_runtime.get().close()


def _cli(*args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "livingai_tasks.cli.main", *args],
                          capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**(env or os.environ), "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    return done.stdout


def _uncrashed(fleet: Fleet) -> tuple[Any, dict[str, Any]]:
    from tests.agent_app import agent_loop

    run = lai.start(agent_loop.s("trip", "calm"))
    wait_status(fleet, run.execution_id, ExecutionStatus.COMPLETED)
    assert fleet.count("calm:model") == 5 and fleet.count("calm:refund") == 1
    return step_node(run.execution_id).output, token_totals(store().nodes(run.execution_id))


def test_killed_after_the_tool_resumes_without_repeating_recorded_calls(
        journal_fleet: tuple[Fleet, str]) -> None:
    from tests.agent_app import agent_loop

    fleet, url = journal_fleet
    w1 = fleet.worker("w1")
    expected, tokens = _uncrashed(fleet)
    fleet.pause("storm:model:3")  # the 4th model call, after the refund's effect
    run = lai.start(agent_loop.s("trip", "storm"))
    wait_for(lambda: fleet.count("storm:model:3") == 1, 30, "the call after the refund")
    w1.kill_group()
    fleet.unpause("storm:model:3")
    assert fleet.count("storm:refund") == 1
    fleet.worker("w2")
    fleet.beat()
    wait_status(fleet, run.execution_id, ExecutionStatus.COMPLETED)
    assert fleet.count("storm:refund") == 1  # the tool's effect happened once
    # recorded model calls were not repeated; the one killed mid-call ran again
    assert [fleet.count(f"storm:model:{t}") for t in range(5)] == [1, 1, 1, 2, 1]
    step = step_node(run.execution_id)
    assert step.output == expected and step.metadata["attempt"] == 2
    nodes = store().nodes(run.execution_id)
    assert token_totals(nodes) == tokens and tokens["calls"] == 5  # tokens counted once
    assert f"tokens: {tokens['total_tokens']} " in _cli("show", run.execution_id, "--store", url)
    stats = json.loads(_cli("stats", "--tokens", "5", "--store", url, "--json"))
    assert stats["tokens"][run.execution_id] == tokens


def test_killed_inside_the_tool_holds_the_step_in_doubt_until_resolved(
        journal_fleet: tuple[Fleet, str]) -> None:
    from tests.agent_app import agent_loop

    fleet, _ = journal_fleet
    fleet.pause("doubt:refund")
    w1 = fleet.worker("w1")
    run = lai.start(agent_loop.s("trip", "doubt"))
    wait_for(lambda: fleet.count("doubt:refund") == 1, 30, "the refund to start")
    w1.kill_group()
    fleet.unpause("doubt:refund")
    fleet.worker("w2")
    fleet.beat()
    wait_status(fleet, run.execution_id, ExecutionStatus.IN_DOUBT)
    time.sleep(3)  # more recovery ticks: it stays held, the tool never runs again
    assert fleet.count("doubt:refund") == 1
    assert [fleet.count(f"doubt:model:{t}") for t in range(5)] == [1, 1, 1, 0, 0]
    step = step_node(run.execution_id)
    refund_id = call_node_id(step.id, 3)
    assert step.status is Status.IN_DOUBT and store().get_node(refund_id).status is \
        Status.IN_DOUBT
    assert refund_id in store().get_execution(run.execution_id).reason

    # The operator checked with the payment provider: the refund went through. The command
    # `show` prints for the held call, run as an operator would (the app from the env).
    assert f"livingai-tasks resolve {run.execution_id} {refund_id} --app <module:app> --done" \
        in _cli("show", run.execution_id, env=fleet.env)
    _cli("resolve", run.execution_id, refund_id, "--app", "tests.agent_app:app",
         "--done", json.dumps({"refunded": 42, "topic": "trip"}), env=fleet.env)
    wait_status(fleet, run.execution_id, ExecutionStatus.COMPLETED)
    assert fleet.count("doubt:refund") == 1
    assert [fleet.count(f"doubt:model:{t}") for t in range(5)] == [1, 1, 1, 1, 1]
    assert step_node(run.execution_id).output == {
        "notes": [f"trip: thought {t}" for t in range(5)],
        "receipt": {"refunded": 42, "topic": "trip"}}


def test_a_step_woken_from_a_wait_replays_its_calls(fleet: Fleet) -> None:
    from tests.agent_app import agent_waits

    fleet.worker("w1")
    run = lai.start(agent_waits.s("trip", "wake"))
    wait_status(fleet, run.execution_id, ExecutionStatus.WAITING)
    assert [fleet.count(f"wake:model:{t}") for t in range(3)] == [1, 1, 0]
    assert lai.send(run.execution_id, "go", {"ok": True}, key="k1") is True
    assert run.get(timeout=40) == {"notes": [f"trip: thought {t}" for t in range(3)],
                                   "answer": {"ok": True}}
    # the body ran twice, its model calls before the wait once
    assert [fleet.count(f"wake:model:{t}") for t in range(3)] == [1, 1, 1]
    assert token_totals(store().nodes(run.execution_id))["calls"] == 3
