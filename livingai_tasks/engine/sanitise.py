"""Sanitise a write a store refused for its content, where that keeps its meaning.

Only free text changes: an execution's `reason`, an error's message and traceback, and the
string values inside input, output and metadata. A NUL and any character the store cannot
encode (a lone surrogate) is written as its escape, literally (U+0000 -> the six characters
"\\u0000"); text longer than _MAX_TEXT is cut, with a marker saying how much was cut. Ids,
statuses and numbers are never touched: changing them would change what the record says.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from ..nodes import ErrorInfo
from .queued_write import QueuedWrite

__all__ = ["sanitise_write", "sanitise_text", "set_aside_text"]

_MAX_TEXT = 1_000_000  # characters kept of one free-text value
_FREE_TEXT_CHANGES = ("reason", "metadata")  # update fields that hold free text


def sanitise_text(text: str) -> str:
    out = []
    for ch in text:
        code = ord(ch)
        if code == 0 or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    clean = "".join(out)
    if len(clean) > _MAX_TEXT:
        cut = len(clean) - _MAX_TEXT
        clean = f"{clean[:_MAX_TEXT]}...[livingai_tasks: {cut} characters cut]"
    return clean


def _value(value: Any) -> Any:
    if isinstance(value, str):
        return sanitise_text(value)
    if isinstance(value, dict):
        return {sanitise_text(k) if isinstance(k, str) else k: _value(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_value(v) for v in value)
    return value


def _error(error: ErrorInfo | None) -> ErrorInfo | None:
    if error is None:
        return None
    return dataclasses.replace(
        error, message=sanitise_text(error.message),
        traceback=None if error.traceback is None else sanitise_text(error.traceback))


def sanitise_write(op: QueuedWrite) -> bool:
    """Sanitise `op` in place; whether anything changed (nothing: retrying cannot help)."""
    before = (op.node, op.execution, dict(op.changes))
    if op.node is not None:
        n = op.node
        op.node = dataclasses.replace(n, input=_value(n.input), output=_value(n.output),
                                      metadata=_value(n.metadata), error=_error(n.error))
    if op.execution is not None:
        e = op.execution
        op.execution = dataclasses.replace(
            e, reason=None if e.reason is None else sanitise_text(e.reason),
            metadata=_value(e.metadata))
    for name in _FREE_TEXT_CHANGES:
        if name in op.changes:
            op.changes[name] = _value(op.changes[name])
    return (op.node, op.execution, op.changes) != before


def set_aside_text(op: QueuedWrite) -> str:
    """The refused write as JSON, every non-ASCII character escaped (so a log line can carry
    it whole); the binary checkpoint left out."""
    record: dict[str, Any] = {"kind": op.kind, "execution_id": op.execution_id}
    if op.node is not None:
        record["node"] = {f.name: getattr(op.node, f.name)
                          for f in dataclasses.fields(op.node) if f.name != "checkpoint"}
    if op.execution is not None:
        record["execution"] = dataclasses.asdict(op.execution)
    if op.changes:
        record["changes"] = op.changes
    return json.dumps(record, default=str, ensure_ascii=True)
