"""Durable waits on real worker processes: approval gates, events, timeouts and sleeps, with
workers (and beat) killed while executions wait. Redis broker unless named; Redis store
unless named (PostgreSQL for some); RabbitMQ for one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import chain

import livingai_tasks as lai
from livingai_tasks import ExecutionStatus, Status
from livingai_tasks.celery_wing import runtime as lai_runtime
from livingai_tasks.celery_wing.context import idempotency_key_of
from livingai_tasks.cli.main import main as cli
from livingai_tasks.mailbox import is_entry

from .conftest import REDIS_URL, need_rabbitmq, pg_url
from .fleet import Fleet, execution_status, make_fleet, store, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def pg_fleet(tmp_path: Path, pg_schema: str) -> Iterator[Fleet]:
    url = pg_url(pg_schema)
    schema_store = lai.open_store(url)
    schema_store.migrate()
    schema_store.close()
    f = make_fleet(tmp_path, url)
    yield f
    f.close()
    lai_runtime.get().close()


def waiting_step(eid: str, timeout: float = 30) -> Any:
    """The step an execution waits in, once it is WAITING."""
    wait_for(lambda: execution_status(eid) is ExecutionStatus.WAITING, timeout,
             f"execution {eid} to be WAITING")
    execution = store().get_execution(eid)
    node = store().get_node(execution.current_node_id)
    assert node.status is Status.WAITING
    return node


def assert_slot_free(fleet: Fleet) -> None:
    """The only worker slot is free: another execution runs to the end meanwhile."""
    from tests.agent_app import step

    assert lai.start(step.s(1, name="other")).get(timeout=30) == 2


def completed(eid: str, timeout: float = 40) -> None:
    wait_for(lambda: execution_status(eid) is ExecutionStatus.COMPLETED, timeout,
             f"execution {eid} to be COMPLETED")


def _approve_flow(fleet: Fleet) -> None:
    from tests.agent_app import charge_gated, plan, summarize

    fleet.worker("w1", concurrency=1)
    run = lai.start(chain(plan.s("pay"), charge_gated.s(), summarize.s()))
    node = waiting_step(run.execution_id)
    wait = node.metadata["wait"]
    assert wait["kind"] == "approval" and wait["tool"] == "tests.agent_app.charge_gated"
    assert node.input["args"][0]["goal"] == "pay"  # the pending call is on record
    assert_slot_free(fleet)
    assert fleet.count("charge_gated") == 0
    lai.approve(run.execution_id, node.id, by="alice", comment="looks right")
    assert run.get(timeout=40) == "done: pay"
    completed(run.execution_id)
    done = store().get_node(node.id)
    assert done.status is Status.SUCCESS and done.metadata["approval"]["by"] == "alice"
    assert done.metadata["approval"]["comment"] == "looks right"
    assert done.output["key"] == idempotency_key_of(run.execution_id, node.id)
    assert (fleet.count("plan"), fleet.count("charge_gated"), fleet.count("summarize")) == \
        (1, 1, 1)


def test_approve_runs_the_gated_tool_once_and_no_slot_is_held(fleet: Fleet) -> None:
    _approve_flow(fleet)


def test_approve_on_rabbitmq(tmp_path: Path, redis_prefix: str) -> None:
    amqp = need_rabbitmq()
    f = make_fleet(tmp_path, f"{REDIS_URL}?prefix={redis_prefix}", broker=amqp)
    try:
        _approve_flow(f)
    finally:
        f.close()
        lai_runtime.get().close()


def test_deny_from_the_cli_fails_the_step_and_the_errback_sees_it(pg_fleet: Fleet) -> None:
    from tests.agent_app import charge_gated, on_error, plan

    pg_fleet.worker("w1")
    run = lai.start(chain(plan.s("pay"), charge_gated.s()).on_error(on_error.s()))
    node = waiting_step(run.execution_id)
    assert cli(["deny", run.execution_id, node.id, "--app", "tests.agent_app:app",
                "--by", "bob", "--reason", "too expensive"]) == 0
    wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.FAILED, 30,
             "the execution to be FAILED")
    failed = store().get_node(node.id)
    assert failed.status is Status.FAILED and failed.error.type == "ApprovalDenied"
    assert "bob" in failed.error.message and "too expensive" in failed.error.message
    wait_for(lambda: pg_fleet.count("errback:ApprovalDenied") == 1, 20, "the errback")
    assert pg_fleet.count("charge_gated") == 0
    # a second decision is refused: the first one stands
    with pytest.raises(lai.WaitError):
        lai.approve(run.execution_id, node.id, by="bob")


def test_an_approval_nobody_gives_in_time_denies_the_call(fleet: Fleet) -> None:
    from tests.agent_app import charge_gated_briefly, plan

    fleet.worker("w1")
    fleet.beat()
    run = lai.start(chain(plan.s("pay"), charge_gated_briefly.s()))
    node = waiting_step(run.execution_id)
    assert node.metadata["wait"]["deadline"] is not None
    wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.FAILED, 40,
             "the execution to fail at its approval deadline")
    failed = store().get_node(node.id)
    assert failed.error.type == "ApprovalDenied" and "timeout" in failed.error.message
    assert fleet.count("charge_gated_briefly") == 0


def test_a_gate_that_decides_per_call(fleet: Fleet) -> None:
    from tests.agent_app import charge_over_100

    fleet.worker("w1")
    small = lai.start(charge_over_100.s({"amount": 20}))
    assert small.get(timeout=30)["charged"] is True  # not gated: runs at once
    big = lai.start(charge_over_100.s({"amount": 500}))
    node = waiting_step(big.execution_id)
    with pytest.raises(lai.WaitError, match="approvers are alice"):
        lai.approve(big.execution_id, node.id, by="mallory")
    lai.approve(big.execution_id, node.id, by="alice")
    assert big.get(timeout=30)["charged"] is True
    assert fleet.count("charge_over_100") == 2


def test_an_event_wakes_the_waiting_step_and_is_delivered_once(pg_fleet: Fleet) -> None:
    from tests.agent_app import await_event

    pg_fleet.worker("w1")
    run = lai.start(chain(await_event.s(0), await_event.s()))
    first = waiting_step(run.execution_id)
    assert first.metadata["wait"] == {**first.metadata["wait"], "kind": "event", "name": "go"}
    assert_slot_free(pg_fleet)
    assert lai.send(run.execution_id, "go", {"n": 1}, key="k1") is True
    assert lai.send(run.execution_id, "go", {"n": 1}, key="k1") is False  # a sender's retry
    # the duplicate did not feed the second step: it waits for an event of its own
    wait_for(lambda: (store().get_execution(run.execution_id).current_node_id != first.id
                      and execution_status(run.execution_id) is ExecutionStatus.WAITING),
             30, "the second step to wait")
    assert pg_fleet.count("await_event_received") == 1
    assert lai.send(run.execution_id, "go", {"n": 2}, key="k2") is True
    out = run.get(timeout=40)
    assert out["payload"] == {"n": 2} and out["value"]["payload"] == {"n": 1}
    completed(run.execution_id)
    entries = [n for n in store().nodes(run.execution_id) if is_entry(n)]
    assert len(entries) == 2
    assert pg_fleet.count("await_event_received") == 2


def test_an_event_sent_before_the_wait_is_kept(fleet: Fleet) -> None:
    from tests.agent_app import await_event

    run = lai.start(await_event.s(7))  # no worker yet: the step has not started
    assert lai.send(run.execution_id, "go", "early", key="early") is True
    fleet.worker("w1")
    assert run.get(timeout=40) == {"value": 7, "payload": "early"}
    assert fleet.count("await_event_runs") == 1  # it never had to wait


def test_a_wait_times_out_into_the_step(fleet: Fleet) -> None:
    from tests.agent_app import await_event

    fleet.worker("w1")
    fleet.beat()
    run = lai.start(await_event.s(1, timeout=1.5))
    waiting_step(run.execution_id)
    assert run.get(timeout=40) == {"value": 1, "timed_out": True}
    assert fleet.count("await_event_timeout") == 1
    # a late event is kept but changes nothing: the execution is over
    completed(run.execution_id)
    with pytest.raises(lai.WaitError, match="COMPLETED"):
        lai.send(run.execution_id, "go", "late")


def test_a_sleep_survives_a_fleet_restart(fleet: Fleet) -> None:
    from tests.agent_app import nap

    fleet.worker("w1")
    fleet.beat()
    run = lai.start(nap.s(0, seconds=4))
    node = waiting_step(run.execution_id)
    assert node.metadata["wait"]["kind"] == "sleep"
    for proc in fleet.procs:
        proc.stop()  # the worker (pool included) and beat, SIGKILL
    fleet.procs.clear()
    fleet.worker("w2")
    fleet.beat()
    assert run.get(timeout=60) == {"value": 0, "slept": 4}
    assert (fleet.count("nap_runs"), fleet.count("nap_done")) == (2, 1)


def test_a_send_racing_the_wait_is_not_lost(fleet: Fleet) -> None:
    from tests.agent_app import await_event

    fleet.worker("w1")
    fleet.beat()
    fleet.pause("record_waiting")
    run = lai.start(await_event.s(5))
    # the step looked at its mailbox (empty) and is held before recording WAITING
    wait_for(lambda: fleet.count("record_waiting_reached") == 1, 30, "the step to be held")
    assert lai.send(run.execution_id, "go", "raced", key="r") is True  # nobody waits yet
    fleet.unpause("record_waiting")
    assert run.get(timeout=40) == {"value": 5, "payload": "raced"}
    assert fleet.count("await_event_received") == 1


@pytest.mark.parametrize("store_kind", ["redis", "postgres"])
def test_a_fleet_killed_while_executions_wait_completes_each_once(
        request: pytest.FixtureRequest, store_kind: str) -> None:
    fleet = request.getfixturevalue("fleet" if store_kind == "redis" else "pg_fleet")
    from tests.agent_app import await_event, charge_card

    n = 50
    fleet.worker("w1", concurrency=2)
    fleet.beat()
    runs = [lai.start(chain(await_event.s(i), charge_card.s())) for i in range(n)]
    for run in runs:
        waiting_step(run.execution_id, timeout=60)
    for proc in fleet.procs:
        proc.stop()  # workers and beat, SIGKILL
    fleet.procs.clear()
    fleet.worker("w2", concurrency=2)
    fleet.beat()
    for i, run in enumerate(runs):
        lai.send(run.execution_id, "go", i, key=f"k{i}")
        lai.send(run.execution_id, "go", i, key=f"k{i}")  # and its sender's retry
    for i, run in enumerate(runs):
        assert run.get(timeout=90)["payload"] == i
        completed(run.execution_id)
    assert fleet.count("charge_card") == n
    assert fleet.count("await_event_received") == n


def test_a_waiting_execution_can_be_cancelled(fleet: Fleet) -> None:
    from tests.agent_app import await_event

    fleet.worker("w1")
    run = lai.start(await_event.s(3))
    waiting_step(run.execution_id)
    assert cli(["cancel", run.execution_id, "--store", fleet.env["LIVINGAI_STORE"], "--by",
                "ops", "--reason", "not needed"]) == 0
    execution = store().get_execution(run.execution_id)
    assert execution.status is ExecutionStatus.CANCELLED and "ops" in execution.reason
    with pytest.raises(lai.WaitError, match="CANCELLED"):
        lai.send(run.execution_id, "go", 1)
    assert fleet.count("await_event_received") == 0


def test_start_after_runs_a_tool_later_without_holding_a_worker(fleet: Fleet) -> None:
    import time

    from tests.agent_app import charge_later

    fleet.worker("w1")
    fleet.beat()
    started = time.time()
    run = lai.start(charge_later.s({"amount": 5}))
    node = waiting_step(run.execution_id)
    assert node.metadata["wait"]["name"] == "lai.start_after"
    assert_slot_free(fleet)
    assert fleet.count("charge_later") == 0
    out = run.get(timeout=40)
    assert out["charged_at"] - started >= 2.5
    assert fleet.count("charge_later") == 1
