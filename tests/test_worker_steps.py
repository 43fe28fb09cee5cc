"""Steps on real Celery worker processes and a real broker (Redis, and RabbitMQ)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from celery import chain, chord, group

import livingai_tasks as lai
from livingai_tasks import ExecutionStatus, Status
from livingai_tasks.celery_wing import runtime as lai_runtime

from .conftest import REDIS_URL, need_rabbitmq
from .fleet import Fleet, children_of, execution_status, make_fleet, store, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

def test_three_step_chain_on_real_workers(fleet: Fleet) -> None:
    from tests.agent_app import plan, search, summarize

    fleet.worker("w1", concurrency=2)
    run = lai.start(chain(plan.s("book a flight"), search.s(), summarize.s()))
    assert run.get(timeout=60) == "done: book a flight"
    wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.COMPLETED, 10,
             "the execution to be COMPLETED")
    # A middle step's outcome may trail by writer.OUTCOME_HOLD_S: on Redis it waits in its
    # pool child for that child's next step to carry it.
    wait_for(lambda: [n.status for n in store().nodes(run.execution_id)]
             == [Status.SUCCESS] * 3, 5, "every step's outcome on record")
    nodes = store().nodes(run.execution_id)
    assert [n.metadata["task"] for n in nodes] == ["tests.agent_app.plan",
                                                    "tests.agent_app.search",
                                                    "tests.agent_app.summarize"]
    assert [n.seq for n in nodes] == [1, 2, 3]
    assert [n.status for n in nodes] == [Status.SUCCESS] * 3
    assert nodes[2].parent_id == nodes[1].id and nodes[1].parent_id == nodes[0].id
    assert nodes[1].input["args"][0] == nodes[0].output
    # what recovery needs to resume the first step: the rest of the chain
    chain_rest = nodes[0].metadata["request"]["chain"]
    assert [c["task"] for c in chain_rest] == ["tests.agent_app.summarize",
                                               "tests.agent_app.search"]
    assert (fleet.count("plan"), fleet.count("search"), fleet.count("summarize")) == (1, 1, 1)


def test_headers_survive_a_chain_across_two_workers(fleet: Fleet) -> None:
    from tests.agent_app import step

    queue_b = fleet.queue + "-b"
    w1 = fleet.worker("w1")
    fleet.queue, fleet_queue = queue_b, fleet.queue
    w2 = fleet.worker("w2")
    fleet.queue = fleet_queue
    canvas = chain(step.s(0), step.s().set(queue=queue_b), step.s(), step.s().set(queue=queue_b))
    run = lai.start(canvas)
    assert run.get(timeout=60) == 4
    nodes = store().nodes(run.execution_id)
    assert [n.seq for n in nodes] == [1, 2, 3, 4]
    owners = [n.metadata["owner"].split(":")[1] for n in nodes]
    assert owners[0] == owners[2] and owners[1] == owners[3] and owners[0] != owners[1]
    assert {int(o) for o in owners} <= {*children_of(w1.pid), *children_of(w2.pid)}
    assert all(n.execution_id == run.execution_id for n in nodes)


def test_group_and_chord_keep_one_execution(fleet: Fleet) -> None:
    from tests.agent_app import collect, step

    fleet.worker("w1", concurrency=2)
    run = lai.start(chord(group(step.s(i) for i in range(4)), collect.s()))
    assert run.get(timeout=60) == 1 + 2 + 3 + 4
    wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.COMPLETED, 10,
             "COMPLETED")
    nodes = store().nodes(run.execution_id)
    members = [n for n in nodes if n.metadata["task"] == "tests.agent_app.step"]
    [body] = [n for n in nodes if n.metadata["task"] == "tests.agent_app.collect"]
    assert len(members) == 4 and len({n.id for n in members}) == 4
    assert {n.seq for n in members} == {1} and body.seq == 2
    assert body.parent_id in {n.id for n in members}

    grun = lai.start(group(step.s(10), step.s(20)))
    assert sorted(grun.get(timeout=60)) == [11, 21]
    wait_for(lambda: execution_status(grun.execution_id) is ExecutionStatus.COMPLETED, 10,
             "the group's execution to be COMPLETED")
    assert len(store().nodes(grun.execution_id)) == 2


def test_failure_and_retry_are_recorded(fleet: Fleet) -> None:
    from tests.agent_app import fail, flaky

    fleet.worker("w1")
    run = lai.start(chain(flaky.s(4), fail.s()))
    with pytest.raises(ValueError, match="bad value 40"):
        run.get(timeout=60, propagate=True)
    wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.FAILED, 10, "FAILED")
    flaky_node, fail_node = store().nodes(run.execution_id)
    versions = store().node_versions(flaky_node.id)
    # A RUNNING version its outcome superseded may be gone (an idempotent step's input is
    # stored once): the outcomes stay, each with its attempt.
    assert [(v.status, v.metadata["attempt"]) for v in versions
            if v.status is not Status.RUNNING] == [(Status.RETRYING, 1), (Status.SUCCESS, 2)]
    assert flaky_node.metadata["attempt"] == 2 and flaky_node.output == 40
    assert fail_node.status is Status.FAILED and fail_node.error.type == "ValueError"
    assert fleet.count("flaky") == 2 and fleet.count("fail") == 1
    assert "bad value 40" in store().get_execution(run.execution_id).reason


def test_a_duplicate_delivery_of_a_finished_step_does_not_run_it(fleet: Fleet) -> None:
    from tests.agent_app import app, charge_card, plan, search, summarize

    worker = fleet.worker("w1")
    run = lai.start(chain(plan.s("x"), search.s(), charge_card.s(), summarize.s()))
    assert run.get(timeout=60) == "done: x"
    charge = next(n for n in store().nodes(run.execution_id)
                  if n.metadata["task"] == "tests.agent_app.charge_card")
    assert fleet.count("charge_card") == 1
    # The same message again, as a redelivery would bring it: same task id, same headers,
    # same continuation. Neither the tool nor the (already finished) rest of the chain runs
    # again: Celery reports both tasks succeeded a second time, with recorded outputs.
    from livingai_tasks.celery_wing.recover import republish

    summarize_node = store().nodes(run.execution_id)[-1]
    republish(app, charge, fence=0)
    wait_for(lambda: worker.text().count(f"summarize[{summarize_node.id}] succeeded") == 2, 30,
             "the continuation to be delivered again")
    assert worker.text().count(f"charge_card[{charge.id}] succeeded") == 2
    assert (fleet.count("charge_card"), fleet.count("summarize")) == (1, 1)


def test_chain_on_rabbitmq(tmp_path: Path, redis_prefix: str) -> None:
    amqp = need_rabbitmq()
    fleet = make_fleet(tmp_path, f"{REDIS_URL}?prefix={redis_prefix}", broker=amqp)
    try:
        from tests.agent_app import plan, search, summarize

        fleet.worker("w1")
        run = lai.start(chain(plan.s("rabbit"), search.s(), summarize.s()))
        assert run.get(timeout=60) == "done: rabbit"
        nodes = store().nodes(run.execution_id)
        assert [n.seq for n in nodes] == [1, 2, 3]
        assert all(n.status is Status.SUCCESS for n in nodes)
    finally:
        fleet.close()
        lai_runtime.get().close()


def test_a_group_completes_only_when_its_last_member_finishes(fleet: Fleet) -> None:
    from tests.agent_app import step

    fleet.pause("g1")
    fleet.worker("w1", concurrency=1)  # members run one by one: later ones have no node yet
    run = lai.start(group(step.s(i, name=f"g{i}") for i in range(3)))
    wait_for(lambda: fleet.count("g1") == 1, 30, "the second member to start")
    time.sleep(0.5)  # g0 finished: the execution must still be running
    assert execution_status(run.execution_id) is ExecutionStatus.RUNNING
    fleet.unpause("g1")
    wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.COMPLETED, 60,
             "the group's execution to be COMPLETED")
    nodes = store().nodes(run.execution_id)
    assert len(nodes) == 3 and all(n.status is Status.SUCCESS for n in nodes)


def test_a_revoked_step_is_recorded_cancelled(fleet: Fleet) -> None:
    from tests.agent_app import app, plan, step

    fleet.pause("blocker")
    fleet.worker("w1", concurrency=1)
    busy = lai.start(step.s(0, name="blocker"))
    wait_for(lambda: fleet.count("blocker") == 1, 30, "the worker to be busy")
    queued = lai.start(plan.s("never"))
    app.control.revoke(queued.result.id)
    fleet.unpause("blocker")
    wait_for(lambda: execution_status(queued.execution_id) is ExecutionStatus.CANCELLED, 30,
             "the revoked execution to be CANCELLED")
    [node] = store().nodes(queued.execution_id)
    assert node.status is Status.CANCELLED and node.error.message == "revoked"
    assert fleet.count("plan") == 0
    assert busy.get(timeout=30) == 1


def test_values_celery_carries_are_recorded_as_those_values(fleet: Fleet) -> None:
    import datetime
    import decimal
    import uuid

    from tests.agent_app import check_types, typed_values

    fleet.worker("w1")
    run = lai.start(chain(typed_values.s(7), check_types.s()))
    assert run.get(timeout=60) == ["at:datetime", "day:date", "id:UUID", "price:Decimal",
                                   "raw:bytes"]
    wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.COMPLETED, 20,
             "the execution to be COMPLETED")
    first, second = store().nodes(run.execution_id)
    assert first.output == {
        "at": datetime.datetime(2026, 12, 3, 9, 30, 7, tzinfo=datetime.timezone.utc),
        "day": datetime.date(2026, 12, 3), "id": uuid.UUID(int=7),
        "price": decimal.Decimal("19.90"), "raw": bytes([0, 255, 7])}
    assert second.input["args"][0] == first.output  # what recovery would feed it
    time.sleep(2)  # nothing is re-driven afterwards
    assert (fleet.count("typed_values"), fleet.count("check_types")) == (1, 1)
