"""StepIdentity: the one form of a step's place in its execution, and its wire headers."""

from __future__ import annotations

from types import SimpleNamespace

from livingai_tasks import ExecutionNode, NodeType
from livingai_tasks.celery_wing.messages import (
    HEADER_EXECUTION,
    HEADER_FENCE,
    HEADER_PARENT,
    HEADER_SEQ,
    StepIdentity,
    is_tagged,
    tag_kwargsrepr,
)


def test_headers_round_trip() -> None:
    identity = StepIdentity("e", "p", 3, 2)
    headers = identity.to_headers()
    assert headers == {HEADER_EXECUTION: "e", HEADER_PARENT: "p", HEADER_SEQ: 3,
                       HEADER_FENCE: 2}
    assert StepIdentity.from_headers(headers) == identity


def test_no_execution_header_means_no_identity() -> None:
    assert StepIdentity.from_headers({HEADER_SEQ: 2}) is None
    assert StepIdentity.from_request(SimpleNamespace(headers=None)) is None


def test_a_worker_delivery_and_an_eager_apply_read_the_same() -> None:
    headers = StepIdentity("e", None, 1, 0).to_headers()
    delivered = SimpleNamespace(headers=None, **headers)  # Celery sets them as attributes
    eager = SimpleNamespace(headers=headers)
    assert StepIdentity.from_request(delivered) == StepIdentity.from_request(eager) == \
        StepIdentity("e", None, 1, 0)


def test_the_next_step_follows_the_node_and_a_retry_stays_in_place() -> None:
    running = StepIdentity("e", "a", 2, 1)
    assert running.for_publish("b", "c") == StepIdentity("e", "b", 3, 1)
    assert running.for_publish("b", "b") == running  # Task.retry(): the same task id


def test_a_recorded_node_is_published_again_under_a_new_fence() -> None:
    node = ExecutionNode(id="n", execution_id="e", parent_id="p", seq=4, type=NodeType.TOOL)
    assert StepIdentity.of_node(node, 7) == StepIdentity("e", "p", 4, 7)


def test_flower_sees_the_execution_in_kwargsrepr() -> None:
    shown = tag_kwargsrepr("{'x': 1}", StepIdentity("e1", None, 2, 0), NodeType.TOOL)
    assert shown == "{'x': 1} [livingai execution=e1 seq=2 type=TOOL]"
    assert is_tagged(shown) and not is_tagged("{'x': 1}")
