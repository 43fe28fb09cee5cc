"""RecoveryEngine.plan on hand-made records: pure logic, so the memory store is fine here."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import pytest

from livingai_tasks import (
    Action,
    Execution,
    ExecutionNode,
    ExecutionStatus,
    NodeType,
    RecoveryEngine,
    Status,
    encode,
    open_store,
)
from livingai_tasks.nodes import utcnow

CHAIN_REST = {"chain": [{"task": "next", "args": [], "kwargs": {}, "options": {}}]}


@pytest.fixture
def store() -> Any:
    s = open_store("memory://")
    s.create_execution(Execution(id="e"))
    return s


def node(seq: int, status: Status, type: NodeType = NodeType.PROMPT, **meta: Any) -> ExecutionNode:
    request = meta.pop("request", {})
    return ExecutionNode(execution_id="e", id=f"n{seq}", seq=seq, type=type, status=status,
                         metadata={"task": f"step{seq}", "attempt": 1, "request": request,
                                   **meta})


def plan(store: Any, **kw: Any) -> Any:
    # `now` is read at each call: records in these tests are stamped with the real clock.
    return RecoveryEngine(store, max_attempts=3, stuck_after_s=60, **kw).plan("e")


def test_crashed_idempotent_step_is_resumed_and_earlier_tools_skipped(store: Any) -> None:
    store.append([node(1, Status.SUCCESS, NodeType.TOOL, request=CHAIN_REST),
                  node(2, Status.CRASHED, request=CHAIN_REST)])
    p = plan(store)
    assert p.action is Action.RESUME and p.resume_node_id == "n2"
    assert [n.id for n in p.replay_nodes] == ["n2"]
    assert [n.id for n in p.skipped_nodes] == ["n1"]
    assert p.in_doubt_nodes == [] and "step2" in p.reason


def test_a_tool_that_was_running_is_held_not_rerun(store: Any) -> None:
    store.append([node(1, Status.SUCCESS), node(2, Status.RUNNING, NodeType.TOOL)])
    p = plan(store)
    assert p.action is Action.HOLD and [n.id for n in p.in_doubt_nodes] == ["n2"]
    assert p.resume_nodes == [] and "may or may not have happened" in p.reason


@pytest.mark.parametrize("meta", [{"reconcilable": True}, {"idempotent": True},
                                  {"resolution": "retry"}])
def test_a_tool_that_can_be_checked_or_rerun_is_resumed(store: Any, meta: dict[str, Any]) -> None:
    status = Status.IN_DOUBT if "resolution" in meta else Status.CRASHED
    store.append([node(1, status, NodeType.TOOL, **meta)])
    p = plan(store)
    assert p.action is Action.RESUME and p.resume_node_id == "n1"


def test_all_done_only_the_summary_was_behind(store: Any) -> None:
    store.append([node(1, Status.SUCCESS, request=CHAIN_REST), node(2, Status.SUCCESS)])
    assert plan(store).action is Action.COMPLETE


def test_stuck_between_steps_waits_then_replays_the_last_output(store: Any) -> None:
    recent = node(1, Status.SUCCESS, NodeType.TOOL, request=CHAIN_REST).evolve(
        completed_at=utcnow())
    store.append([recent])
    assert plan(store).action is Action.WAIT
    old = recent.evolve(completed_at=utcnow() - timedelta(seconds=120))
    store.append([old])
    p = plan(store)
    assert p.action is Action.RESUME and p.resume_node_id == "n1"
    assert [n.id for n in p.skipped_nodes] == ["n1"]  # replayed for its output, not rerun
    assert "never started" in p.reason


def test_recoveries_of_one_execution_are_capped(store: Any) -> None:
    store.put_execution(Execution(id="e", attempts=10))
    store.append([node(1, Status.CRASHED)])
    p = plan(store)
    assert p.action is Action.FAIL and "gave up after 10 recoveries" in p.reason


def test_crashes_spread_over_steps_do_not_count_as_a_poison_step(store: Any) -> None:
    # Three earlier recoveries, each of a different step: no step crashed max_attempts times.
    store.put_execution(Execution(id="e", attempts=3))
    store.append([node(1, Status.SUCCESS, attempt=2), node(2, Status.SUCCESS, attempt=2),
                  node(3, Status.CRASHED, attempt=2)])
    p = plan(store)
    assert p.action is Action.RESUME and p.resume_node_id == "n3"


def test_a_step_that_crashes_every_attempt_fails_the_execution(store: Any) -> None:
    store.append([node(1, Status.CRASHED, attempt=3)])
    p = plan(store)
    assert p.action is Action.FAIL and "crashed in each of its 3 attempts" in p.reason


def test_retries_wait_until_overdue(store: Any) -> None:
    store.append([node(1, Status.RETRYING, retry_due=time.time() + 30)])
    assert plan(store).action is Action.WAIT
    store.append([node(1, Status.RETRYING, retry_due=time.time() - 600)])
    assert plan(store).action is Action.RESUME


def test_not_running_or_unknown(store: Any) -> None:
    assert RecoveryEngine(store).plan("nope").found is False
    store.update_execution("e", status=ExecutionStatus.COMPLETED)
    store.append([node(1, Status.CRASHED)])
    assert plan(store).action is Action.WAIT


def test_the_plan_carries_the_last_durable_checkpoint(store: Any) -> None:
    store.append([node(1, Status.RUNNING).evolve(checkpoint=encode(b'{"i": 3}'))])
    p = plan(store)
    assert p.checkpoint_node.id == "n1" and p.state == b'{"i": 3}'
    assert p.to_dict()["checkpoint_node"] == "n1"


def test_a_dead_holder_means_the_next_step_is_not_still_queued() -> None:
    from datetime import timedelta

    from livingai_tasks import Execution, ExecutionNode, NodeType, Status
    from livingai_tasks.nodes import Meta, utcnow
    from livingai_tasks.recovery import Action, RecoveryEngine
    from livingai_tasks.stores.memory import MemoryStore

    store = MemoryStore()
    store.create_execution(Execution(id="e"))
    store.append([ExecutionNode(
        id="n1", execution_id="e", seq=1, type=NodeType.PROMPT, status=Status.SUCCESS,
        completed_at=utcnow() - timedelta(seconds=1),
        metadata={Meta.TASK: "t", Meta.REQUEST: {"chain": [{"task": "next"}]}})])
    planner = RecoveryEngine(store, stuck_after_s=60)
    assert planner.plan("e").action is Action.WAIT  # it may still be queued somewhere
    resumed = planner.plan("e", holder_died=True)  # its holder is dead: it is not
    assert resumed.action is Action.RESUME and [n.id for n in resumed.resume_nodes] == ["n1"]


def _chained_to(next_id: str) -> dict[str, Any]:
    """A saved request whose chain runs `next_id` next (Celery freezes a chain's task ids)."""
    return {"chain": [{"task": "later", "options": {"task_id": "n9"}},
                      {"task": "next", "options": {"task_id": next_id}}]}


@pytest.mark.parametrize("status", [Status.RUNNING, Status.CRASHED])
def test_a_step_whose_next_step_is_on_record_is_not_run_again(store: Any,
                                                               status: Status) -> None:
    """Its outcome's record was lost with its process (held for that process's next step),
    but the chain's next step is on record, so its body returned: only the next step's own
    crash is resumed. A tool is never taken as done this way: its record says what it is."""
    store.append([node(1, status, request=_chained_to("n2")),
                  node(2, Status.CRASHED, request=CHAIN_REST)])
    p = plan(store)
    assert p.action is Action.RESUME and [n.id for n in p.resume_nodes] == ["n2"]
    # Without its next step on record, the step is unfinished as ever.
    alone = open_store("memory://")
    alone.create_execution(Execution(id="e"))
    alone.append([node(1, status, request=_chained_to("n2"))])
    assert [n.id for n in plan(alone).resume_nodes] == ["n1"]
    tools = open_store("memory://")
    tools.create_execution(Execution(id="e"))
    tools.append([node(1, status, NodeType.TOOL, request=_chained_to("n2")),
                  node(2, Status.SUCCESS, request=CHAIN_REST)])
    assert plan(tools).action is Action.HOLD
