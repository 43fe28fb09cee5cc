"""Replay modes on real recorded executions, run through real workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from celery import chain

import livingai_tasks as lai
from livingai_tasks import ConfigError, ExecutionStatus
from livingai_tasks.celery_wing import runtime as lai_runtime
from livingai_tasks.celery_wing.replay import ReplayError, ReplaySession

from .fleet import Fleet, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.fixture
def fleet(fleet: Fleet) -> Fleet:
    fleet.worker("w1", concurrency=2)
    return fleet


def session() -> ReplaySession:
    from tests.agent_app import app

    return ReplaySession(app, lai_runtime.get().engine.store)


def finished(eid: str) -> bool:
    ex = lai_runtime.get().engine.store.get_execution(eid)
    return ex is not None and ex.status is ExecutionStatus.COMPLETED


def recorded_run(fleet: Fleet) -> str:
    from tests.agent_app import charge_card, plan, search, summarize

    run = lai.start(chain(plan.s("trip"), search.s(), charge_card.s(), summarize.s()))
    assert run.get(timeout=60) == "done: trip"
    wait_for(lambda: finished(run.execution_id), 10, "the original to complete")
    return run.execution_id


def versions(eid: str) -> list[Any]:
    store = lai_runtime.get().engine.store
    return [[v.to_dict() for v in store.node_versions(n.id)] for n in store.nodes(eid)]


def test_mock_tools_reruns_reasoning_without_side_effects(fleet: Fleet) -> None:
    original = recorded_run(fleet)
    before = versions(original)
    run = session().start(original, "MOCK_TOOLS")
    wait_for(lambda: finished(run.execution_id), 60, "the replay to complete")
    assert fleet.count("charge_card") == 1  # the tool was served its recorded output
    assert (fleet.count("plan"), fleet.count("search"), fleet.count("summarize")) == (2, 1, 2)
    diffs = session().diff(original, run.execution_id)
    assert [d.status for d in diffs] == ["same"] * 4
    replay = lai_runtime.get().engine.store.get_execution(run.execution_id)
    assert replay.metadata["replay_of"] == original
    assert versions(original) == before  # the original record is untouched


def test_full_refuses_side_effects_unless_allowed(fleet: Fleet) -> None:
    original = recorded_run(fleet)
    with pytest.raises(ReplayError, match="MOCK_TOOLS"):
        session().start(original, "FULL")
    run = session().start(original, "FULL", allow_side_effects=True)
    wait_for(lambda: finished(run.execution_id), 60, "the replay to complete")
    assert fleet.count("charge_card") == 2
    statuses = [d.status for d in session().diff(original, run.execution_id)]
    assert statuses == ["same", "same", "changed", "same"]  # a new charge, a new key


def test_from_node_and_counterfactual(fleet: Fleet) -> None:
    original = recorded_run(fleet)
    nodes = lai_runtime.get().engine.store.nodes(original)
    last = nodes[-1]
    run = session().start(original, "FROM_NODE", node_id=last.id)
    wait_for(lambda: finished(run.execution_id), 60, "FROM_NODE to complete")
    assert [d.status for d in session().diff(original, run.execution_id)] == ["same"]
    assert fleet.count("charge_card") == 1 and fleet.count("summarize") == 2

    other = {**last.input["args"][0], "goal": "a different trip"}
    run = session().start(original, "COUNTERFACTUAL", node_id=last.id, new_input=[other])
    wait_for(lambda: finished(run.execution_id), 60, "COUNTERFACTUAL to complete")
    [diff] = session().diff(original, run.execution_id)
    assert diff.status == "changed" and diff.replayed_output == "done: a different trip"
    with pytest.raises(ConfigError, match="needs a node id"):
        session().start(original, "FROM_NODE")
    with pytest.raises(ConfigError, match="Unknown replay mode"):
        session().start(original, "SIDEWAYS")
    with pytest.raises(ConfigError, match="counterfactual input"):
        session().start(original, "COUNTERFACTUAL", node_id=last.id, new_input="text")


def test_replay_through_the_cli_prints_the_diff(fleet: Fleet) -> None:
    original = recorded_run(fleet)
    env = {**fleet.env, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    out = subprocess.run([sys.executable, "-m", "livingai_tasks.cli", "replay", original,
                          "--mode", "mock_tools", "--app", "tests.agent_app:app",
                          "--store", fleet.env["LIVINGAI_STORE"], "--json"],
                         capture_output=True, text=True, timeout=90, env=env,
                         cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "COMPLETED"
    assert [d["status"] for d in result["diff"]] == ["same"] * 4


def test_mock_tools_also_mocks_a_non_idempotent_step_that_is_not_a_tool(fleet: Fleet) -> None:
    from tests.agent_app import plan, send_email, summarize

    run = lai.start(chain(plan.s("mail"), send_email.s(), summarize.s()))
    assert run.get(timeout=60) == "done: mail"
    wait_for(lambda: finished(run.execution_id), 10, "the original to complete")
    replay = session().start(run.execution_id, "MOCK_TOOLS")
    wait_for(lambda: finished(replay.execution_id), 60, "the replay to complete")
    assert fleet.count("send_email") == 1  # served its recorded output, not sent again
    assert [d.status for d in session().diff(run.execution_id, replay.execution_id)] == \
        ["same"] * 3
