"""Crash recovery with real worker processes killed by SIGKILL mid-step, real beat, real
brokers, and side effects counted outside our stores (Redis counters written by the tools).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from celery import chain

import livingai_tasks as lai
from livingai_tasks import Execution, ExecutionNode, ExecutionStatus, NodeType, Status
from livingai_tasks.celery_wing import runtime as lai_runtime

from .conftest import REDIS_URL, need_rabbitmq, need_redis, race
from .fleet import (
    BROKER_DB,
    Fleet,
    children_of,
    execution_status,
    fleet_store_url,
    make_fleet,
    store,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def five_steps() -> Any:
    from tests.agent_app import step

    return chain(step.s(0, name="s1"), *(step.s(name=f"s{i}") for i in range(2, 6)))


def wait_completed(fleet: Fleet, eid: str, timeout: float = 60) -> None:
    try:
        wait_for(lambda: execution_status(eid) is ExecutionStatus.COMPLETED, timeout, "COMPLETED")
    except AssertionError:
        print(fleet.logs())
        print(store().get_execution(eid))
        for n in store().nodes(eid):
            print([(v.status, v.metadata.get("fence")) for v in store().node_versions(n.id)])
        raise


def test_whole_worker_killed_during_an_idempotent_step(fleet: Fleet) -> None:
    fleet.pause("s3")
    w1 = fleet.worker("w1")
    run = lai.start(five_steps())
    wait_for(lambda: fleet.count("s3") == 1, 30, "step 3 to start")
    w1.kill()  # the main process: its pool child dies with it (PDEATHSIG)
    assert children_of(w1.pid) == []
    fleet.unpause("s3")
    fleet.worker("w2", concurrency=2)
    fleet.beat()
    wait_completed(fleet, run.execution_id)
    counts = [fleet.count(f"s{i}") for i in range(1, 6)]
    assert counts == [1, 1, 2, 1, 1]  # step 3 ran again; steps 1-2 did not
    nodes = store().nodes(run.execution_id)
    assert [n.seq for n in nodes] == [1, 2, 3, 4, 5] and nodes[-1].output == 5
    s3_history = [v.status for v in store().node_versions(nodes[2].id)]
    # (the second attempt's RUNNING version may be gone: its outcome supersedes it)
    assert [s for s in s3_history if s is not Status.RUNNING][-2:] == [Status.CRASHED,
                                                                        Status.SUCCESS]
    assert nodes[2].metadata["attempt"] == 2 and nodes[2].metadata["fence"] == 1
    assert run.get(timeout=30) == 5  # Celery's own result for the last step


def test_pool_child_killed_while_the_worker_lives(fleet: Fleet) -> None:
    fleet.pause("s3")
    w1 = fleet.worker("w1", concurrency=1)
    fleet.beat()
    run = lai.start(five_steps())
    wait_for(lambda: fleet.count("s3") == 1, 30, "step 3 to start")
    [child] = children_of(w1.pid)
    fleet.unpause("s3")
    os.kill(child, signal.SIGKILL)  # Celery: WorkerLostError in the main process
    wait_completed(fleet, run.execution_id)
    assert [fleet.count(f"s{i}") for i in range(1, 6)] == [1, 1, 2, 1, 1]
    s3 = store().nodes(run.execution_id)[2]
    history = store().node_versions(s3.id)
    crashed = next(v for v in history if v.status is Status.CRASHED)
    assert crashed.error.type == "WorkerLostError"
    assert w1.popen.poll() is None  # the same worker, with a new child, finished the run


def test_pool_child_killed_before_its_step_s_start_reached_the_store(tmp_path: Path,
                                                                     request: Any) -> None:
    """An idempotent step's start waits in its pool child's memory while the writer gathers
    (writer.GATHER_S, widened here so that the kill lands there every time). The child
    SIGKILLed then leaves the store nothing of the step; the worker's main process records
    it CRASHED from the message it holds, and recovery runs it again at once: well within
    the lease (30 s) and the stuck-step timer (300 s) it would otherwise wait for."""
    fleet = make_fleet(tmp_path, fleet_store_url(request, "postgres"), lease_s=30.0,
                       stuck_after_s=300.0, extra_env={"LAI_TEST_GATHER_S": "3600"})
    try:
        fleet.pause("s3")
        w1 = fleet.worker("w1", concurrency=1)
        fleet.beat()
        run = lai.start(five_steps())
        wait_for(lambda: fleet.count("s3") == 1, 30, "step 3 to start")
        # Steps 1 and 2 are on record (step 2's outcome, sent without waiting, may still be
        # on its way), step 3's start is not: it waits in the child (its heartbeat, 7.5 s
        # away, would send it), so a third record here fails the wait.
        wait_for(lambda: [n.status for n in store().nodes(run.execution_id)]
                 == [Status.SUCCESS] * 2, 5, "steps 1 and 2 alone on record")
        [child] = children_of(w1.pid)
        fleet.unpause("s3")
        os.kill(child, signal.SIGKILL)
        wait_completed(fleet, run.execution_id, timeout=25)
        assert [fleet.count(f"s{i}") for i in range(1, 6)] == [1, 1, 2, 1, 1]
        nodes = store().nodes(run.execution_id)
        assert nodes[-1].output == 5
        crashed = next(v for v in store().node_versions(nodes[2].id)
                       if v.status is Status.CRASHED)
        assert crashed.error is not None and crashed.error.type == "WorkerLostError"
        # What the child would have stored: its input, its place in the chain, its owner.
        assert crashed.input == {"args": [2], "kwargs": {"name": "s3"}}
        assert crashed.parent_id == nodes[1].id and crashed.seq == 3
        assert crashed.metadata["attempt"] == 1 and crashed.metadata["request"]["chain"]
        assert crashed.metadata["owner"].endswith(f":{child}")
        assert nodes[2].metadata["attempt"] == 2
    finally:
        fleet.close()
        lai_runtime.get().close()


def test_pool_child_killed_holding_its_last_step_s_outcome(tmp_path: Path,
                                                           request: Any) -> None:
    """On Redis a step's outcome waits in its pool child for that child's next step to
    carry it (engine/entry.py; the window widened here so it waits for ever). A child
    SIGKILLed idle loses it: step 1's record stays RUNNING though step 2, on another
    worker, took its output. When step 2 then crashes too, recovery resumes step 2 alone:
    step 1's next step is on record, so its body returned, and it is not run again."""
    from tests.agent_app import step

    fleet = make_fleet(tmp_path, fleet_store_url(request, "redis"), lease_s=30.0,
                       stuck_after_s=300.0, extra_env={"LAI_TEST_GATHER_S": "3600"})
    try:
        later = fleet.queue + "-later"
        fleet.pause("s2")
        w1 = fleet.worker("w1", concurrency=1)
        fleet.queue, first = later, fleet.queue
        w2 = fleet.worker("w2", concurrency=1)
        fleet.queue = first
        fleet.beat()
        run = lai.start(chain(step.s(0, name="s1"), step.s(name="s2").set(queue=later),
                              *(step.s(name=f"s{i}") for i in range(3, 6))))
        wait_for(lambda: fleet.count("s2") == 1, 30, "step 2 to start")
        s1, s2 = store().nodes(run.execution_id)
        assert s1.status is Status.RUNNING and s1.metadata["task"].endswith("step")
        [idle] = children_of(w1.pid)
        os.kill(idle, signal.SIGKILL)  # holding step 1's SUCCESS, running nothing
        [child] = children_of(w2.pid)
        fleet.unpause("s2")
        os.kill(child, signal.SIGKILL)  # mid-step: CRASHED, lease expired
        wait_completed(fleet, run.execution_id, timeout=60)
        assert [fleet.count(f"s{i}") for i in range(1, 6)] == [1, 2, 1, 1, 1]
        nodes = store().nodes(run.execution_id)
        assert nodes[0].status is Status.RUNNING  # its outcome died with the child
        assert nodes[1].input["args"] == [1] and nodes[-1].output == 5
    finally:
        fleet.close()
        lai_runtime.get().close()


def test_killed_between_a_finished_tool_and_the_next_step(fleet: Fleet, tmp_path: Path) -> None:
    from tests.agent_app import charge_card, plan, search, summarize

    later = fleet.queue + "-later"
    w1 = fleet.worker("w1")
    fleet.beat()
    run = lai.start(chain(plan.s("trip"), search.s(), charge_card.s(),
                          summarize.s().set(queue=later)))
    # The continuation is published to a queue no worker reads yet: catch it there and drop
    # it, which is what a crash between the tool's return and the publish would lose.
    assert fleet.broker is not None
    wait_for(lambda: fleet.broker.llen(later) == 1, 30, "the continuation to be published")
    w1.kill()
    fleet.broker.delete(later)
    assert fleet.count("charge_card") == 1
    fleet.queue, first = later, fleet.queue
    fleet.worker("w2", concurrency=2)
    fleet.queue = first
    fleet.worker("w3", concurrency=2)
    wait_completed(fleet, run.execution_id)
    assert fleet.count("charge_card") == 1 and fleet.count("summarize") == 1
    nodes = store().nodes(run.execution_id)
    charge, summary = nodes[2], nodes[3]
    assert summary.input["args"][0] == charge.output  # fed by the recorded output
    assert summary.output == "done: trip"


def test_killed_during_a_non_idempotent_tool_is_held_in_doubt(fleet: Fleet) -> None:
    from tests.agent_app import charge_card, plan, search, summarize

    fleet.pause("charge_card")
    w1 = fleet.worker("w1")
    run = lai.start(chain(plan.s("trip"), search.s(), charge_card.s(), summarize.s()))
    wait_for(lambda: fleet.count("charge_card") == 1, 30, "the charge to start")
    w1.kill()
    fleet.unpause("charge_card")
    fleet.worker("w2", concurrency=2)
    fleet.beat()
    wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.IN_DOUBT, 30, "IN_DOUBT")
    time.sleep(3)  # several more recovery ticks: it must stay held, never re-run
    assert fleet.count("charge_card") == 1 and fleet.count("summarize") == 0
    charge = store().nodes(run.execution_id)[2]
    assert charge.status is Status.IN_DOUBT
    assert "may or may not have happened" in store().get_execution(run.execution_id).reason

    # The operator checked with the payment provider: it went through.
    lai.resolve(run.execution_id, charge.id, done=True, output={"goal": "trip", "charge": "ok"})
    wait_completed(fleet, run.execution_id)
    assert fleet.count("charge_card") == 1 and fleet.count("summarize") == 1
    assert store().nodes(run.execution_id)[3].output == "done: trip"
    with pytest.raises(lai.ResolveError, match="only IN_DOUBT"):
        lai.resolve(run.execution_id, charge.id, retry=True)


def test_in_doubt_tool_resumes_itself_with_a_reconcile_callback(fleet: Fleet) -> None:
    from tests.agent_app import charge_reconciled, plan, search, summarize

    fleet.pause("charge_reconciled")
    w1 = fleet.worker("w1")
    run = lai.start(chain(plan.s("trip"), search.s(), charge_reconciled.s(), summarize.s()))
    # The charge made at the provider (its key recorded), not only begun: a kill between
    # the two leaves a charge the provider never saw, which reconcile rightly runs again.
    wait_for(lambda: fleet.count("charge_reconciled") == 1
             and fleet.redis.keys(f"{fleet.counters}:charge_key:*"), 30, "the charge to be made")
    w1.kill()
    fleet.unpause("charge_reconciled")
    fleet.worker("w2", concurrency=2)
    fleet.beat()
    wait_completed(fleet, run.execution_id)
    assert fleet.count("charge_reconciled") == 1  # the provider said it happened: not re-run
    charge = store().nodes(run.execution_id)[2]
    assert charge.output["charge"] == {"reconciled": True} and charge.metadata["reconciled"]


def test_rabbitmq_redelivery_and_recovery_do_not_double_run(tmp_path: Path,
                                                            redis_prefix: str) -> None:
    amqp = need_rabbitmq()
    fleet = make_fleet(tmp_path, f"{REDIS_URL}?prefix={redis_prefix}", broker=amqp)
    try:
        fleet.pause("s3")
        w1 = fleet.worker("w1")
        run = lai.start(five_steps())
        wait_for(lambda: fleet.count("s3") == 1, 30, "step 3 to start")
        w1.kill()  # RabbitMQ requeues the unacked step 3 at once (acks_late)
        fleet.unpause("s3")
        fleet.worker("w2", concurrency=2)
        fleet.beat()
        wait_completed(fleet, run.execution_id)
        assert [fleet.count(f"s{i}") for i in range(1, 6)] == [1, 1, 2, 1, 1]
    finally:
        fleet.close()
        lai_runtime.get().close()


# -- racing recovery ticks -------------------------------------------------------------


def _tick(store_url: str, broker: str, queue: str, start: Any, out: Any) -> None:
    from celery import Celery

    import tests.agent_app  # noqa: F401 - recovery publishes only steps it knows, as a worker
    from livingai_tasks import Settings
    from livingai_tasks.celery_wing.recover import recover_once
    from livingai_tasks.stores import open_store

    app = Celery("racer", broker=broker)
    app.conf.task_default_queue = queue
    s = open_store(store_url)
    s.get_execution("warm-up")
    start.wait(10)
    settings = Settings(lease_s=30, max_attempts=3, max_recoveries=10, stuck_after_s=5,
                        recovery_page=100)
    report = recover_once(app, s, settings, owner=f"racer-{os.getpid()}")
    out.put((report.claimed, report.published))


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_racing_recovery_ticks_resume_each_execution_once(kind: str, request: Any) -> None:
    from .conftest import pg_url

    need_redis()
    if kind == "redis":
        store_url = f"{REDIS_URL}?prefix={request.getfixturevalue('redis_prefix')}"
    else:
        store_url = pg_url(request.getfixturevalue("pg_schema"))
    s = lai.open_store(store_url)
    s.migrate()
    queue = f"lai-race-{os.getpid()}-{kind}"
    orphans = [f"orphan-{i}" for i in range(20)]
    past = time.time() - 60
    for eid in orphans:
        s.create_execution(Execution(id=eid, lease_deadline=past))
        s.append([ExecutionNode(id=f"{eid}-n1", execution_id=eid, type=NodeType.PROMPT, seq=1,
                                status=Status.RUNNING,
                                metadata={"task": "tests.agent_app.step", "attempt": 1,
                                          "request": {"task": "tests.agent_app.step"}},
                                input={"args": [1], "kwargs": {}})])
    results = race(_tick, [(store_url, BROKER_DB, queue)] * 4, warm_up_s=1.5)
    claimed = [eid for c, _ in results for eid in c]
    published = [nid for _, pub in results for nid in pub]
    import redis

    r = redis.Redis.from_url(BROKER_DB)
    try:
        assert sorted(claimed) == sorted(orphans)  # every orphan once, none twice
        assert sorted(published) == sorted(f"{e}-n1" for e in orphans)
        assert r.llen(queue) == len(orphans)  # one message per orphan on the broker
        assert all(s.get_execution(e).fence == 1 for e in orphans)
    finally:
        r.delete(queue)
        r.close()
        s.close()


def test_a_first_message_lost_before_any_step_ran_is_published_again(fleet: Fleet) -> None:
    """A worker killed while it held an execution's first message (prefetched, or taken
    from a broker that forgets it): no step ever started, so no lease was renewed."""
    run = lai.start(five_steps())  # no worker yet: the message waits in the queue
    assert fleet.broker is not None
    wait_for(lambda: fleet.broker.llen(fleet.queue) == 1, 10, "the first message")
    fleet.broker.delete(fleet.queue)  # ... and is lost
    fleet.worker("w1", concurrency=2)
    fleet.beat()
    wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.COMPLETED, 60,
             "the execution to be resumed from its recorded canvas")
    assert [fleet.count(f"s{i}") for i in range(1, 6)] == [1, 1, 1, 1, 1]
    assert "first step never started" in (store().get_execution(run.execution_id).reason or "")
    assert run.get(timeout=30) == 5  # the same task ids: Celery's own result arrives too
