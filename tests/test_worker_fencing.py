"""Messages that do not match the record are refused, on real workers: a task id reused by
another execution, a forged execution or fence header, a revoke that kills a running tool,
and a start() whose publish failed."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from celery import Celery, chain

import livingai_tasks as lai
from livingai_tasks import (
    Execution,
    ExecutionNode,
    ExecutionStatus,
    NodeType,
    Status,
)
from livingai_tasks.celery_wing.messages import StepIdentity
from livingai_tasks.nodes import Meta

from .fleet import Fleet, execution_status, store, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def test_a_task_id_reused_by_another_execution_is_refused(fleet: Fleet) -> None:
    from tests.agent_app import plan

    worker = fleet.worker("w1")
    first = lai.start(plan.s("first").set(task_id="reused-id"))
    assert first.get(timeout=60)["goal"] == "first"
    # (Celery's result is keyed by the task id too: the second run's result is the first's.)
    second = lai.start(plan.s("second").set(task_id="reused-id"))
    wait_for(lambda: "reused-id] raised unexpected: StepRefusedError" in worker.text(), 30,
             "the worker to refuse the second message")
    assert "reused for another execution" in worker.text()
    assert fleet.count("plan") == 1  # the second never ran
    node = store().get_node("reused-id")
    assert node.execution_id == first.execution_id and node.output["goal"] == "first"
    assert [n.id for n in store().nodes(second.execution_id)] == []  # nothing moved


def _held_charge(eid: str, node_id: str) -> None:
    """A charge whose worker died mid-call, held IN_DOUBT (as recovery records it)."""
    store().create_execution(Execution(id=eid, status=ExecutionStatus.IN_DOUBT))
    store().append([ExecutionNode(
        id=node_id, execution_id=eid, seq=1, type=NodeType.TOOL, status=Status.IN_DOUBT,
        input={"args": [{"goal": "g"}], "kwargs": {}},
        metadata={Meta.TASK: "tests.agent_app.charge_card", Meta.IDEMPOTENT: False,
                  Meta.ATTEMPT: 1, Meta.FENCE: 1, Meta.IN_DOUBT_REASON: "worker died"})])


@pytest.mark.parametrize("forged", [StepIdentity("someone-else", None, 1, 1),
                                    StepIdentity("held", None, 1, 7),
                                    StepIdentity("held", None, 3, 1)])
def test_a_forged_header_cannot_move_a_held_step(fleet: Fleet, forged: StepIdentity) -> None:
    from tests.agent_app import app, charge_card

    worker = fleet.worker("w1")
    eid = "held"
    node_id = f"charge-{forged.execution_id}-{forged.fence}-{forged.seq}"
    _held_charge(eid, node_id)
    app.send_task(charge_card.name, args=[{"goal": "g"}], task_id=node_id,
                  headers=forged.to_headers())
    wait_for(lambda: f"{node_id}] raised unexpected: StepRefusedError" in worker.text(), 30,
             "the worker to refuse the message")
    assert fleet.count("charge_card") == 0
    assert store().get_node(node_id).status is Status.IN_DOUBT
    assert store().get_execution(eid).status is ExecutionStatus.IN_DOUBT


def test_revoke_terminating_a_running_tool_holds_it_in_doubt(fleet: Fleet) -> None:
    from tests.agent_app import app, charge_card, plan, search, summarize

    fleet.pause("charge_card")
    fleet.worker("w1", concurrency=1)
    run = lai.start(chain(plan.s("t"), search.s(), charge_card.s(), summarize.s()))
    wait_for(lambda: fleet.count("charge_card") == 1, 30, "the charge to start")
    charge = next(n for n in store().nodes(run.execution_id)
                  if n.metadata[Meta.TASK] == charge_card.name)
    app.control.revoke(charge.id, terminate=True)
    wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.IN_DOUBT, 30,
             "the execution to be IN_DOUBT")
    held = store().get_node(charge.id)
    assert held.status is Status.IN_DOUBT and "terminated by a revoke" in \
        held.metadata[Meta.IN_DOUBT_REASON]
    time.sleep(2)  # nothing re-runs it or goes on
    assert fleet.count("charge_card") == 1 and fleet.count("summarize") == 0


def test_revoke_terminating_an_idempotent_step_cancels_it(fleet: Fleet) -> None:
    from tests.agent_app import app, plan, search

    fleet.pause("search")
    fleet.worker("w1", concurrency=1)
    run = lai.start(chain(plan.s("t"), search.s()))
    wait_for(lambda: fleet.count("search") == 1, 30, "the search to start")
    node = store().nodes(run.execution_id)[-1]
    app.control.revoke(node.id, terminate=True)
    wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.CANCELLED, 30,
             "the execution to be CANCELLED")
    assert store().get_node(node.id).status is Status.CANCELLED


def test_a_start_that_raises_never_runs_later(tmp_path: Path) -> None:
    app = Celery("unreachable", broker="redis://127.0.0.1:1/0", set_as_current=False)
    app.conf.update(task_publish_retry=False, broker_connection_retry=False,
                    broker_connection_timeout=1)

    @lai.agent_step(app, name="unreachable.step")
    def step_(x: int) -> int:
        return x

    lai.install(app, store=f"sqlite:///{tmp_path}/s.db")
    from livingai_tasks.celery_wing import runtime

    runtime.get().engine.store.migrate()
    with pytest.raises(Exception) as info:
        lai.start(step_.s(1), execution_id="never")
    assert not isinstance(info.value, AssertionError)
    execution = runtime.get().engine.store.get_execution("never")
    assert execution.status is ExecutionStatus.CANCELLED
    assert execution.reason.startswith("start() failed to publish")
    assert execution.lease_deadline is None  # out of recovery's reach
    runtime.get().close()
