"""Step values in the record, exactly as Celery's JSON carries them between steps.

Celery's JSON serializer (kombu's) sends a datetime, date, time, UUID, Decimal or bytes as a
tagged object, {"__type__": ..., "__value__": ...}, and the next step receives the value
itself again. The record uses the same tags, so what it holds and what recovery or replay
feed a step are the values the original message carried, not strings and not a repr.
A value neither can carry (a set, an arbitrary object) is refused with a clear error.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any

__all__ = ["tag", "untag", "CARRIED"]

CARRIED = "dict, list, str, int, float (finite), bool, None, datetime, date, time, UUID, " \
          "Decimal and bytes"

_TYPE, _VALUE = "__type__", "__value__"


def tag(value: Any) -> dict[str, Any]:
    """json.dumps' `default`: a value JSON has no type for, as kombu tags it."""
    # datetime before date: a datetime is a date too.
    if isinstance(value, datetime):
        return {_TYPE: "datetime", _VALUE: value.isoformat()}
    if isinstance(value, date):
        return {_TYPE: "date", _VALUE: value.isoformat()}
    if isinstance(value, time):
        return {_TYPE: "time", _VALUE: value.isoformat()}
    if isinstance(value, uuid.UUID):
        return {_TYPE: "uuid", _VALUE: {"hex": value.hex}}
    if isinstance(value, Decimal):
        return {_TYPE: "decimal", _VALUE: str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_TYPE: "base64", _VALUE: base64.b64encode(bytes(value)).decode("ascii")}
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_DECODERS: dict[str, Callable[[Any], Any]] = {
    "datetime": datetime.fromisoformat,
    "date": date.fromisoformat,
    "time": time.fromisoformat,
    "uuid": lambda v: uuid.UUID(hex=v["hex"]),
    "decimal": Decimal,
    "base64": lambda v: base64.b64decode(v.encode("ascii")),
}


def untag(obj: dict[str, Any]) -> Any:
    """json.loads' `object_hook`: a tagged object back to its value; any other dict as is."""
    if len(obj) == 2 and _TYPE in obj and _VALUE in obj:
        decoder = _DECODERS.get(obj[_TYPE])
        if decoder is not None:
            try:
                return decoder(obj[_VALUE])
            except (TypeError, ValueError, KeyError, ArithmeticError):
                return obj  # not one of ours after all: keep it as the dict it is
    return obj
