"""Durable waits, pure logic: the mailbox's delivery order and readiness, the entry decision
and the recovery plan for WAITING records, the CLI's commands. Real-worker paths are in
tests/test_waits_workers.py."""

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
    WaitError,
    open_store,
)
from livingai_tasks import mailbox as mb
from livingai_tasks.celery_wing.context import Decision
from livingai_tasks.celery_wing.lifecycle import decide
from livingai_tasks.celery_wing.messages import StepIdentity
from livingai_tasks.celery_wing.waits import seconds
from livingai_tasks.cli.main import build_parser
from livingai_tasks.nodes import Meta, utcnow

CHAIN_REST = {"chain": [{"task": "next", "args": [], "kwargs": {}, "options": {}}]}


def test_an_entry_id_is_the_same_for_every_retry_of_a_send() -> None:
    a = mb.make_entry("e", "go", {"x": 1}, "k1", fence=0)
    b = mb.make_entry("e", "go", {"x": 2}, "k1", fence=3)
    assert a.id == b.id == mb.entry_id("e", "go", "k1")
    assert a.id != mb.entry_id("e", "go", "k2") != mb.entry_id("f", "go", "k1")
    assert mb.is_entry(a) and a.status is Status.SUCCESS and a.type is NodeType.MEMORY


def test_entries_are_delivered_in_arrival_order_and_not_to_another_step() -> None:
    base = utcnow()

    def at(i: int, entry: ExecutionNode) -> ExecutionNode:
        return entry.evolve(created_at=base + timedelta(seconds=i))

    first = at(1, mb.make_entry("e", "go", 1, "a", fence=0))
    second = at(2, mb.make_entry("e", "go", 2, "b", fence=0))
    taken = at(3, mb.make_entry("e", "go", 3, "c", fence=0, consumed_by="other-step"))
    mine = at(4, mb.make_entry("e", "go", 4, "d", fence=0, consumed_by="me"))
    other_name = at(5, mb.make_entry("e", "stop", 5, "e", fence=0))
    got = mb.entries([mine, other_name, second, taken, first], "go", "me")
    assert [n.output for n in got] == [1, 2, 4]  # created in that order, "c" is not mine


def test_readiness_of_events_sleeps_and_timeouts() -> None:
    now = time.time()
    event = mb.make_entry("e", "go", 1, "a", fence=0)
    wait = mb.wait_info("event", "go", 0, now + 10)
    assert mb.readiness(wait, "me", [], now) == ""
    assert mb.readiness(wait, "me", [event], now) == "ready"
    assert mb.readiness(mb.wait_info("event", "go", 1, now + 10), "me", [event], now) == ""
    assert mb.readiness(wait, "me", [], now + 11) == "timeout"
    assert mb.readiness(mb.wait_info("event", "go", 0, None), "me", [], now + 1e9) == ""
    nap = mb.wait_info("sleep", mb.SLEEP, 0, now + 5)
    assert mb.readiness(nap, "me", [], now) == "" and mb.readiness(nap, "me", [], now + 5)


def test_a_timeout_marker_takes_its_index_for_good() -> None:
    marker = mb.timeout_marker("e", "go", "me", 0, 123.0, fence=2)
    late = mb.make_entry("e", "go", "late", "k", fence=2)
    got = mb.entries([marker, late], "go", "me")
    assert mb.is_timeout(got[0]) and not mb.is_timeout(got[1])
    assert marker.metadata[Meta.CONSUMED_BY] == "me"


@pytest.mark.parametrize("name", ["", None, "lai.approval", "x" * 201, 3])
def test_user_event_names_are_checked(name: Any) -> None:
    with pytest.raises(WaitError):
        mb.user_name(name)


def test_durations() -> None:
    assert seconds(timedelta(minutes=2), "t") == 120.0 and seconds(None, "t") is None
    for bad in (-1, "5", True):
        with pytest.raises(WaitError):
            seconds(bad, "t")


def _node(status: Status, *, fence: int = 0, tool: bool = False) -> ExecutionNode:
    return ExecutionNode(execution_id="e", id="n1", seq=1,
                         type=NodeType.TOOL if tool else NodeType.PROMPT, status=status,
                         metadata={"task": "t", "attempt": 1, "fence": fence,
                                   "idempotent": not tool, "owner": "someone-else"})


def test_a_waiting_step_runs_when_published_under_its_fence_and_is_stale_under_an_older() -> None:
    waiting = _node(Status.WAITING, fence=2, tool=True)
    decision, _ = decide(waiting, StepIdentity("e", None, 1, 2), owner="me", reconcilable=False)
    assert decision is Decision.RUN  # a gated tool never started: not IN_DOUBT
    decision, _ = decide(waiting, StepIdentity("e", None, 1, 1), owner="me", reconcilable=False)
    assert decision is Decision.STALE


@pytest.fixture
def store() -> Any:
    s = open_store("memory://")
    s.create_execution(Execution(id="e"))
    return s


def _step(seq: int, status: Status, **meta: Any) -> ExecutionNode:
    return ExecutionNode(execution_id="e", id=f"n{seq}", seq=seq, type=NodeType.PROMPT,
                         status=status, metadata={"task": f"step{seq}", "attempt": 1,
                                                  "request": CHAIN_REST, **meta})


def _plan(store: Any) -> Any:
    return RecoveryEngine(store, max_attempts=3, stuck_after_s=60).plan("e")


def test_a_waiting_execution_is_never_orphaned(store: Any) -> None:
    store.append([_step(1, Status.SUCCESS), _step(2, Status.WAITING)])
    store.update_execution("e", status=ExecutionStatus.WAITING, lease_deadline=time.time() - 5)
    assert _plan(store).action is Action.WAIT


def test_a_waiting_step_of_a_running_execution_is_published_again(store: Any) -> None:
    # its waker claimed the execution and died before (or while) publishing it
    store.append([_step(1, Status.SUCCESS), _step(2, Status.WAITING)])
    p = _plan(store)
    assert p.action is Action.RESUME and p.resume_node_id == "n2"


def test_mailbox_entries_are_not_steps_to_recovery(store: Any) -> None:
    store.append([_step(1, Status.SUCCESS, request={}),
                  mb.make_entry("e", "go", {"late": True}, "k", fence=0)])
    p = _plan(store)
    assert p.action is Action.COMPLETE and p.resume_nodes == []


def test_the_cli_has_the_wait_commands() -> None:
    parser = build_parser()
    a = parser.parse_args(["approve", "E", "N", "--by", "alice", "--comment", "ok"])
    assert (a.execution, a.node, a.by, a.comment) == ("E", "N", "alice", "ok")
    d = parser.parse_args(["deny", "E", "N", "--reason", "too much"])
    assert d.reason == "too much"
    s = parser.parse_args(["send", "E", "go", '{"ok": true}', "--key", "k1"])
    assert (s.name, s.payload, s.key) == ("go", '{"ok": true}', "k1")
    assert parser.parse_args(["list", "--status", "WAITING"]).status == "WAITING"
    assert parser.parse_args(["cancel", "E"]).execution == "E"


def test_show_says_what_a_step_waits_for_and_labels_events() -> None:
    from livingai_tasks.cli.render import render_tree

    waiting = _step(1, Status.WAITING, wait=mb.wait_info("approval", mb.APPROVAL, 0, None,
                                                         approvers=["alice"]))
    event = mb.make_entry("e", "go", 1, "k1", fence=0)
    text = "\n".join(render_tree([event, waiting], "--app a:app "))
    assert "waits for approval (alice)" in text
    assert "livingai-tasks approve e n1 --app a:app --by NAME" in text
    assert "event go (key k1, not received yet)" in text


def _waiting_execution(store: Any, wait: dict[str, Any], lease: float | None) -> ExecutionNode:
    node = _step(1, Status.WAITING, wait=wait, request={"task": "tests.agent_app.await_event"})
    store.append([node])
    store.update_execution("e", status=ExecutionStatus.WAITING, current_node_id=node.id,
                           lease_deadline=lease)
    return node


def _app() -> Any:
    from celery import Celery

    app = Celery("waits-logic", broker="memory://")
    app.conf.task_always_eager = False
    return app


def test_the_tick_puts_back_a_deadline_a_late_lease_renewal_wrote(store: Any) -> None:
    from livingai_tasks import Settings
    from livingai_tasks.celery_wing.wake import wake_due

    _waiting_execution(store, mb.wait_info("event", "go", 0, None), time.time() - 1)
    report = wake_due(_app(), store, Settings(), by="tick")
    assert report.repaired == ["e"] and report.woken == []
    execution = store.get_execution("e")
    assert execution.status is ExecutionStatus.WAITING and execution.lease_deadline is None


def test_the_tick_wakes_a_timed_out_wait_with_a_marker_under_a_new_fence(store: Any) -> None:
    from livingai_tasks import Settings
    from livingai_tasks.celery_wing.wake import wake_due

    before = store.get_execution("e")
    _waiting_execution(store, mb.wait_info("event", "go", 0, time.time() - 1), time.time() - 1)
    report = wake_due(_app(), store, Settings(), by="tick")
    assert report.timed_out == ["e"]
    execution = store.get_execution("e")
    assert execution.status is ExecutionStatus.RUNNING and execution.fence == before.fence + 1
    assert execution.attempts == before.attempts  # a wake is not a recovery
    [marker] = [n for n in store.nodes("e") if mb.is_entry(n)]
    assert mb.is_timeout(marker) and marker.metadata[Meta.CONSUMED_BY] == "n1"
    woken = store.get_node("n1")
    assert woken.status is Status.WAITING and woken.metadata["fence"] == execution.fence
    # a second tick finds nothing due: the execution is RUNNING with a fresh lease
    assert wake_due(_app(), store, Settings(), by="tick").timed_out == []


def test_a_sleep_is_not_woken_before_it_is_due(store: Any) -> None:
    from livingai_tasks import Settings
    from livingai_tasks.celery_wing.wake import wake_due

    due = time.time() + 60
    _waiting_execution(store, mb.wait_info("sleep", mb.SLEEP, 0, due), due)
    report = wake_due(_app(), store, Settings(), by="tick")
    assert (report.woken, report.timed_out, report.repaired) == ([], [], [])
    assert store.get_execution("e").status is ExecutionStatus.WAITING
