"""The record model: versions made by evolve() and their JSON, encoded once per version."""

from __future__ import annotations

import json

import pytest

from livingai_tasks import ExecutionNode, NotJSONSerializableError, Status
from livingai_tasks.celery_wing.replay import _canonical
from livingai_tasks.nodes import dumps_json


def _node(**fields: object) -> ExecutionNode:
    return ExecutionNode(execution_id="e1", type="TOOL", input={"args": [{"q": "flights"}]},
                         status=Status.RUNNING, metadata={"task": "t"}, **fields)  # type: ignore[arg-type]


def test_json_round_trips_and_puts_the_input_first() -> None:
    node = _node()
    raw = node.to_json()
    assert raw.startswith('{"input":{"args":[{"q":"flights"}]},')
    assert ExecutionNode.from_json(raw) == node


def test_a_next_version_carries_its_own_changes_with_the_reused_input() -> None:
    running = _node()
    running.to_json()
    done = running.evolve(status=Status.SUCCESS, output={"charged": 42})
    data = json.loads(done.to_json())
    assert data["status"] == "SUCCESS" and data["output"] == {"charged": 42}
    assert data["input"] == {"args": [{"q": "flights"}]}
    assert ExecutionNode.from_json(done.to_json()) == done
    # The earlier version's JSON is untouched by the later one.
    assert json.loads(running.to_json())["status"] == "RUNNING"


def test_a_new_input_is_encoded_anew() -> None:
    running = _node()
    running.to_json()
    other = running.evolve(input={"args": [2]})
    assert json.loads(other.to_json())["input"] == {"args": [2]}


def test_a_checkpoint_blob_does_not_change_the_json() -> None:
    node = _node()
    with_blob = node.evolve(checkpoint=b"\x00raw")
    assert with_blob.to_json() == node.to_json()
    assert with_blob.checkpoint == b"\x00raw"


def test_non_json_output_is_refused_with_what_is_accepted() -> None:
    node = _node().evolve(output={"when": object()})
    with pytest.raises(NotJSONSerializableError, match="Accepted: dict, list, str"):
        node.to_json()


def test_json_keeps_the_key_order_and_the_replay_diff_ignores_it() -> None:
    assert dumps_json({"b": 1, "a": 2}, what="x") == '{"b":1,"a":2}'
    assert _canonical({"b": 1, "a": {"d": 1, "c": 2}}) == _canonical({"a": {"c": 2, "d": 1},
                                                                      "b": 1})
    assert _canonical({"a": 1}) != _canonical({"a": 1.5})
