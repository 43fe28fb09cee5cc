"""The entry decision as a table: what a starting step does, given the store's latest version
of it, the fence its message carries and who is asking. Pure: no Celery, no store."""

from __future__ import annotations

from typing import Any

import pytest

from livingai_tasks import ExecutionNode, NodeType, Status
from livingai_tasks.celery_wing.context import Decision
from livingai_tasks.celery_wing.lifecycle import decide
from livingai_tasks.celery_wing.messages import StepIdentity
from livingai_tasks.nodes import Meta

ME, OTHER = "host:1", "host:2"
NOW = 1_000.0


def _node(status: Status, *, tool: bool = False, fence: int = 0, owner: str = OTHER,
          execution: str = "e", seq: int = 1, **meta: Any) -> ExecutionNode:
    metadata = {Meta.TASK: "t", Meta.ATTEMPT: 1, Meta.IDEMPOTENT: not tool, Meta.FENCE: fence,
                Meta.OWNER: owner, **meta}
    return ExecutionNode(id="n", execution_id=execution, seq=seq, status=status,
                         type=NodeType.TOOL if tool else NodeType.PROMPT, metadata=metadata)


LIVE, EXPIRED = NOW + 10, NOW - 10

TABLE = [
    # (what the store holds, message fence, reconcilable, lease, decision)
    (None, 0, False, None, Decision.RUN),
    (_node(Status.SUCCESS, fence=2), 1, False, None, Decision.STALE),
    (_node(Status.SUCCESS), 0, False, None, Decision.REPLAY),
    (_node(Status.SKIPPED, tool=True), 0, False, None, Decision.REPLAY),
    (_node(Status.IN_DOUBT, tool=True), 0, True, None, Decision.IN_DOUBT),
    (_node(Status.IN_DOUBT, tool=True, fence=1, **{Meta.RESOLUTION: "retry"}), 1, False, None,
     Decision.RUN),
    (_node(Status.RUNNING), 0, False, LIVE, Decision.STALE),
    (_node(Status.RUNNING, tool=True), 0, False, LIVE, Decision.STALE),
    (_node(Status.RUNNING), 0, False, EXPIRED, Decision.RUN),
    (_node(Status.RUNNING, tool=True), 0, False, EXPIRED, Decision.IN_DOUBT),
    (_node(Status.RUNNING, tool=True), 0, True, EXPIRED, Decision.RECONCILE),
    (_node(Status.RUNNING, tool=True, owner=ME), 0, False, LIVE, Decision.IN_DOUBT),
    (_node(Status.CRASHED, tool=True, fence=1), 1, False, None, Decision.IN_DOUBT),
    (_node(Status.CRASHED, tool=True, fence=1), 1, True, None, Decision.RECONCILE),
    (_node(Status.CRASHED, fence=1), 1, False, None, Decision.RUN),
    (_node(Status.FAILED, tool=True), 0, False, None, Decision.RUN),
    (_node(Status.RETRYING, tool=True), 0, False, None, Decision.RUN),
    # a task id reused by another execution, a step moved, a fence nobody recorded
    (_node(Status.SUCCESS, execution="other"), 0, False, None, Decision.REFUSED),
    (_node(Status.IN_DOUBT, tool=True, execution="other"), 0, False, None, Decision.REFUSED),
    (_node(Status.RUNNING, seq=2), 0, False, EXPIRED, Decision.REFUSED),
    (_node(Status.IN_DOUBT, tool=True, fence=1), 5, False, None, Decision.REFUSED),
]


@pytest.mark.parametrize(("existing", "fence", "reconcilable", "lease", "expected"), TABLE)
def test_the_entry_decision(existing: ExecutionNode | None, fence: int, reconcilable: bool,
                            lease: float | None, expected: Decision) -> None:
    decision, reason = decide(existing, StepIdentity("e", None, 1, fence), owner=ME,
                              reconcilable=reconcilable, lease_deadline=lease, now=NOW)
    assert decision is expected
    assert reason or decision is Decision.RUN  # anything but running says why


def test_an_unknown_outcome_names_the_step_and_its_attempt() -> None:
    _, reason = decide(_node(Status.CRASHED, tool=True, fence=1), StepIdentity("e", None, 1, 1),
                       owner=ME, reconcilable=False, now=NOW)
    assert "tool step t (n)" in reason and "attempt 1" in reason


def test_a_held_step_gives_the_reason_it_was_held_for() -> None:
    held = _node(Status.IN_DOUBT, tool=True, **{Meta.IN_DOUBT_REASON: "worker died in charge"})
    assert decide(held, StepIdentity("e", None, 1, 0), owner=ME, reconcilable=False,
                  now=NOW) == (Decision.IN_DOUBT, "worker died in charge")


def test_a_refusal_names_both_sides() -> None:
    _, reason = decide(_node(Status.SUCCESS, execution="a"), StepIdentity("b", None, 1, 0),
                       owner=ME, reconcilable=False, now=NOW)
    assert "execution a" in reason and "execution b" in reason and "refused" in reason


def test_a_start_is_rebuilt_from_a_dead_child_s_message_only_for_an_idempotent_step() -> None:
    """unsaved_start() (a worker's main process, after its pool child died) gives nothing
    for a tool, whose start is stored before its body runs (no record: the body never ran),
    for a message without a step's headers, and for a request it cannot read."""
    from types import SimpleNamespace

    from livingai_tasks.celery_wing.lifecycle import StepSpec, unsaved_start

    headers = StepIdentity("e", "p", 2, 0).to_headers()
    message = SimpleNamespace(request_dict={"id": "n", **headers},
                              _payload=([1], {}, {"chain": [{"task": "next"}]}))
    tool = StepSpec(type=NodeType.TOOL, idempotent=False)
    prompt = StepSpec(type=NodeType.PROMPT, idempotent=True)
    assert unsaved_start(SimpleNamespace(name="t"), tool, "n", message) is None
    no_headers = SimpleNamespace(request_dict={"id": "n"}, _payload=message._payload)
    assert unsaved_start(SimpleNamespace(name="t"), prompt, "n", no_headers) is None
    unreadable = SimpleNamespace(request_dict=message.request_dict)  # no _payload
    assert unsaved_start(SimpleNamespace(name="t"), prompt, "n", unreadable) is None
