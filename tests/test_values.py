"""The record carries step values exactly as Celery's JSON does (kombu's tags), both ways."""

from __future__ import annotations

import datetime
import decimal
import enum
import json
import uuid

import kombu.utils.json as kombu_json
import pytest

from livingai_tasks import ExecutionNode, NodeType, NotJSONSerializableError
from livingai_tasks.nodes import dumps_json, loads_json
from livingai_tasks.values import tag

VALUES = {
    "aware": datetime.datetime(2026, 12, 3, 9, 30, 1, 250, tzinfo=datetime.timezone.utc),
    "naive": datetime.datetime(2026, 12, 3, 9, 30, 1),
    "day": datetime.date(2026, 12, 3),
    "clock": datetime.time(9, 30, 1, 5),
    "id": uuid.UUID("7a4a89be-2900-417b-9342-6eedd8b178f2"),
    "price": decimal.Decimal("19.90"),
    "raw": b"\x00\xffbinary",
    "nested": [{"when": datetime.date(2000, 1, 1)}, 1, "two", None, True, 2.5],
}


def test_values_read_back_as_the_values_they_were() -> None:
    assert loads_json(dumps_json(VALUES, what="values")) == VALUES


def test_the_record_tags_them_as_celerys_json_does() -> None:
    ours = json.loads(dumps_json(VALUES, what="values"))
    celerys = json.loads(kombu_json.dumps(VALUES))
    assert ours == celerys
    assert kombu_json.loads(dumps_json(VALUES, what="values")) == VALUES  # and Celery reads ours


def test_a_node_keeps_its_values_through_its_json() -> None:
    node = ExecutionNode(execution_id="e", type=NodeType.PROMPT, input={"args": [VALUES]},
                         output=VALUES)
    back = ExecutionNode.from_json(node.to_json())
    assert back.input == {"args": [VALUES]} and back.output == VALUES


def test_a_dict_that_only_looks_tagged_stays_a_dict() -> None:
    odd = {"__type__": "datetime", "__value__": "not a date"}
    assert loads_json(json.dumps({"x": odd})) == {"x": odd}


@pytest.mark.parametrize("value", [{1, 2}, object(), float("nan"), complex(1, 2)])
def test_what_neither_can_carry_is_refused_with_what_is_accepted(value: object) -> None:
    with pytest.raises(NotJSONSerializableError, match="Accepted: dict, list, str.*Decimal"):
        dumps_json({"v": value}, what="an output")


class _Colour(str, enum.Enum):
    RED = "red"


# Values orjson (the fast path for plain JSON) writes differently from the stdlib path, or
# not at all: each must come out as the stdlib path has it.
ODD_ONES = {
    "uuid": [uuid.UUID("7a4a89be-2900-417b-9342-6eedd8b178f2")],
    "tuple": {"pair": (1, "two")},
    "int keys": {1: "one", 2: "two"},
    "str enum": {"colour": _Colour.RED},
    "big int": [2**70],
    "lone surrogate": ["\ud800"],
    "non-ascii": {"name": "Zoë ✓"},
    "negative zero": [-0.0, 1e-7, 1.0],
}


@pytest.mark.parametrize("value", ODD_ONES.values(), ids=list(ODD_ONES))
def test_a_value_orjson_would_write_otherwise_is_recorded_as_the_stdlib_path_has_it(
        value: object) -> None:
    stdlib = json.dumps(value, separators=(",", ":"), allow_nan=False, default=tag)
    assert loads_json(dumps_json(value, what="a value")) == loads_json(stdlib)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_float_is_refused_though_orjson_would_write_null(value: float) -> None:
    with pytest.raises(NotJSONSerializableError):
        dumps_json([1, {"x": value}], what="an output")


def test_a_plain_state_reads_back_equal_through_the_fast_path() -> None:
    state = {"messages": [{"role": "user", "content": "hello " * 50, "n": i, "ok": i % 2 == 0,
                           "score": i / 7, "none": None} for i in range(100)]}
    text = dumps_json(state, what="a state")
    assert loads_json(text) == state == json.loads(text)
