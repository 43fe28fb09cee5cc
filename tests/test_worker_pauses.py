"""A worker paused (SIGSTOP) past its lease while it holds a non-idempotent tool, woken
(SIGCONT) after recovery gave the step to another worker: the zombie's records are refused
for their fence, the chain goes on from the attempt that took over, and the external call is
made at most twice, both times with the same idempotency key (the irreducible case: the
zombie was paused after its start was recorded; a provider that honours the key makes it
one charge)."""

from __future__ import annotations

import os
import signal
import time

import pytest
from celery import chain

import livingai_tasks as lai
from livingai_tasks import ExecutionStatus, ResolveError, Status
from livingai_tasks.nodes import Meta

from .fleet import Fleet, execution_status, store, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _charge_node(run_id: str, task: str) -> object:
    return next(n for n in store().nodes(run_id) if n.metadata[Meta.TASK] == task)


def _keys(fleet: Fleet) -> set[bytes]:
    return set(fleet.redis.keys(f"{fleet.counters}:charge_key:*"))


def test_a_woken_zombie_cannot_record_or_advance_a_reconciled_tool(fleet: Fleet) -> None:
    from tests.agent_app import charge_late_reconciled, plan, search, summarize

    name = "charge_late_reconciled"
    fleet.pause(name)
    w1 = fleet.worker("w1")
    run = lai.start(chain(plan.s("zombie"), search.s(), charge_late_reconciled.s(),
                          summarize.s()))
    wait_for(lambda: any(n.metadata.get(Meta.TASK) == charge_late_reconciled.name
                         for n in store().nodes(run.execution_id)), 30,
             "the tool to start (its start recorded)")
    os.killpg(w1.pid, signal.SIGSTOP)  # paused at the flag, before the call
    try:
        fleet.unpause(name)
        fleet.worker("w2")
        fleet.beat()
        wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.COMPLETED, 60,
                 "the step to be taken over and the chain to complete")
    finally:
        os.killpg(w1.pid, signal.SIGCONT)
    # The zombie wakes, makes its call (same key), and is refused.
    wait_for(lambda: "was refused" in w1.text(), 30, "the zombie's SUCCESS to be refused")
    time.sleep(2)
    assert fleet.count(name) <= 2 and len(_keys(fleet)) == 1  # one key, however many calls
    assert fleet.count("summarize") == 1  # the chain went on once, from the new attempt
    assert run.get(timeout=30) == "done: zombie"
    node = _charge_node(run.execution_id, charge_late_reconciled.name)
    execution = store().get_execution(run.execution_id)
    assert node.metadata[Meta.FENCE] == execution.fence >= 1  # the latest: the current fence
    assert node.metadata[Meta.OWNER].split(":")[1] != str(w1.pid)
    assert execution.status is ExecutionStatus.COMPLETED


def test_a_woken_zombie_cannot_leave_in_doubt_and_retry_waits_for_it(fleet: Fleet) -> None:
    from tests.agent_app import charge_late, plan, search, summarize

    fleet.pause("charge_late")
    w1 = fleet.worker("w1")
    run = lai.start(chain(plan.s("held"), search.s(), charge_late.s(), summarize.s()))
    wait_for(lambda: any(n.metadata.get(Meta.TASK) == charge_late.name
                         for n in store().nodes(run.execution_id)), 30, "the tool to start")
    os.killpg(w1.pid, signal.SIGSTOP)
    try:
        fleet.unpause("charge_late")
        fleet.worker("w2")
        fleet.beat()
        wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.IN_DOUBT, 60,
                 "the tool to be held IN_DOUBT")
    finally:
        os.killpg(w1.pid, signal.SIGCONT)
    wait_for(lambda: "was refused" in w1.text(), 30, "the zombie's SUCCESS to be refused")
    time.sleep(2)
    assert fleet.count("charge_late") == 1  # the zombie made the call, nobody else
    node = _charge_node(run.execution_id, charge_late.name)
    assert node.status is Status.IN_DOUBT  # never overwritten by the zombie's SUCCESS
    assert execution_status(run.execution_id) is ExecutionStatus.IN_DOUBT
    assert fleet.count("summarize") == 0
    # Its worker is alive and beating again: a retry now could charge twice.
    with pytest.raises(ResolveError, match="may still be running"):
        lai.resolve(run.execution_id, node.id, retry=True)
    # The operator asks the provider: the charge went through.
    lai.resolve(run.execution_id, node.id, done=True, output={"goal": "held", "charge": "ok"})
    wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.COMPLETED, 60,
             "the chain to go on from the resolution")
    assert fleet.count("charge_late") == 1 and fleet.count("summarize") == 1


def test_a_woken_zombie_of_a_checkpointing_step_is_refused_and_changes_nothing(
        fleet: Fleet) -> None:
    from tests.agent_app import long_step, step

    fleet.pause("long_step_3")
    w1 = fleet.worker("w1")
    run = lai.start(chain(step.s(0), long_step.s(), step.s(name="after")))
    wait_for(lambda: fleet.count("long_step_iter") == 3, 30, "three checkpoints")
    os.killpg(w1.pid, signal.SIGSTOP)
    try:
        fleet.unpause("long_step_3")
        fleet.worker("w2")
        fleet.beat()
        wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.COMPLETED, 60,
                 "the step to be resumed from its checkpoint and the chain to complete")
    finally:
        os.killpg(w1.pid, signal.SIGCONT)
    result = run.get(timeout=30)
    wait_for(lambda: "older fence" in w1.text(), 30, "the zombie's records to be refused")
    time.sleep(2)
    node = _charge_node(run.execution_id, long_step.name)
    execution = store().get_execution(run.execution_id)
    assert node.metadata[Meta.FENCE] == execution.fence >= 1  # the latest: the new attempt's
    assert node.output == result - 1  # "after" adds one to what the resumed step returned
    assert fleet.count("after") == 1  # the chain went on once
    assert execution.status is ExecutionStatus.COMPLETED


def test_a_worker_paused_between_two_steps_is_resumed_elsewhere_and_its_copy_refused(
        fleet: Fleet) -> None:
    from tests.agent_app import step

    fleet.pause("before:second")  # held after w1 takes the message, before its start is recorded
    w1 = fleet.worker("w1")
    run = lai.start(chain(step.s(1), step.s(name="second")))
    wait_for(lambda: fleet.count("step") == 1 and w1.text().count("] received") == 2,
             30, "the first step to finish and w1 to take the second's message")
    os.killpg(w1.pid, signal.SIGSTOP)
    try:
        fleet.unpause("before:second")
        fleet.worker("w2")
        fleet.beat()
        # Nothing of the second step is on record: its message, held by a worker whose
        # liveness expired, is what recovery resumes.
        wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.COMPLETED, 60,
                 "the second step to be resumed on w2 and the chain to complete")
    finally:
        os.killpg(w1.pid, signal.SIGCONT)
    assert run.get(timeout=30) == 3
    wait_for(lambda: "newer attempt" in w1.text() or "older copy" in w1.text(), 30,
             "w1's copy of the second step to be refused")
    time.sleep(2)
    assert fleet.count("second") == 1  # run once, on w2
    second = next(n for n in store().nodes(run.execution_id) if n.seq == 1)
    execution = store().get_execution(run.execution_id)
    assert second.metadata[Meta.FENCE] == execution.fence >= 1
    assert second.metadata[Meta.OWNER].split(":")[1] != str(w1.pid)
    assert execution.status is ExecutionStatus.COMPLETED
