"""The execution record: ExecutionNode (one step), Execution (the summary). No I/O here.

Field names and enum values follow the livingai 0.4.x model so its users recognise them;
`seq` and the extra statuses are what durable Celery execution needs on top.
Records are values: a status change is a new version made with `evolve()`, never an edit.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from enum import Enum
from typing import Any

import orjson

from .errors import NotJSONSerializableError, RecordError
from .values import CARRIED, tag, untag

__all__ = [
    "NodeType",
    "Status",
    "ExecutionStatus",
    "ErrorInfo",
    "ExecutionNode",
    "Execution",
    "new_id",
    "utcnow",
    "dumps_json",
    "loads_json",
    "Meta",
]


def new_id() -> str:
    return str(uuid.uuid4())


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Meta:
    """The metadata keys the library writes and reads, declared once. A user's own keys
    (start(metadata=...)) live beside them; these names are reserved."""

    # On a step's node
    TASK = "task"  # the Celery task name
    IDEMPOTENT = "idempotent"  # bool: safe to run again
    RECONCILABLE = "reconcilable"  # bool: the tool has a reconcile= callback
    ATTEMPT = "attempt"  # 1 for the first run, +1 per re-run
    FENCE = "fence"  # the execution's fence this version was made under
    OWNER = "owner"  # "host:pid" of the process that ran it
    WORKER = "worker"  # "host:pid" of its worker's main process (its liveness record)
    REQUEST = "request"  # what recovery needs to publish the message again
    IN_DOUBT_REASON = "in_doubt_reason"
    NOT_STARTED = "not_started"  # why a tool's recorded start was withdrawn before it ran
    RETRY_DUE = "retry_due"  # epoch seconds a Task.retry() is due
    RECONCILED = "reconciled"  # SUCCESS decided by the reconcile callback
    RECOVERED_BY = "recovered_by"
    RECOVERED_AT = "recovered_at"
    RESOLUTION = "resolution"  # an operator's decision: "done" or "retry"
    RESOLVED_BY = "resolved_by"
    RESOLVED_AT = "resolved_at"
    WAIT = "wait"  # what a WAITING step waits for (kind, name, index, deadline...): waits.py
    APPROVAL = "approval"  # the decision an approval gate ran (or failed) under
    EVENT = "event"  # on a mailbox entry (mailbox.py): the event's name
    EVENT_KEY = "event_key"  # its sender's deduplication key
    CONSUMED_BY = "consumed_by"  # the step that received it
    WOKEN_BY = "woken_by"  # who resumed a WAITING step, and why
    # On a journaled call's node (a child of its step: journal.py)
    CALL_OF = "call_of"  # the id of the step node the call was made in
    CALL_INDEX = "call_index"  # its order among the step's calls, from 0
    CALL_NAME = "call_name"  # the name it was made under (checked on replay)
    CALL_KIND = "call_kind"  # "model", "tool" or "memory"
    MODEL = "model"  # a model call's model name
    USAGE = "usage"  # a model call's tokens: input_tokens, output_tokens, total_tokens
    # On an execution
    CANVAS = "canvas"  # the frozen canvas start() published, to publish again if lost
    GROUP_SIZES = "group_sizes"  # group id -> members, to tell when the last one finished
    ROOT_TASK = "root_task"  # an execution a step started without start()
    REPLAY_OF = "replay_of"
    REPLAY_MODE = "replay_mode"
    REPLAY_FROM = "replay_from"


class NodeType(str, Enum):
    """What kind of work a node is (livingai 0.4.x values)."""

    PROMPT = "PROMPT"
    TOOL = "TOOL"
    MEMORY = "MEMORY"
    BRANCH = "BRANCH"


class Status(str, Enum):
    """Lifecycle of one node. The first four are livingai 0.4.x's."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    SUCCESS = "SUCCESS"
    FAILED = "FAILED"
    RETRYING = "RETRYING"
    CRASHED = "CRASHED"  # its process died mid-step (WorkerLostError or an expired lease)
    IN_DOUBT = "IN_DOUBT"  # a side effect may or may not have happened: awaits a decision
    SKIPPED = "SKIPPED"  # not run again on recovery; its recorded output stands
    CANCELLED = "CANCELLED"
    WAITING = "WAITING"  # suspended on a durable wait (approval, event, sleep): no slot held

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset({Status.SUCCESS, Status.FAILED, Status.SKIPPED, Status.CANCELLED})


class ExecutionStatus(str, Enum):
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    IN_DOUBT = "IN_DOUBT"
    CANCELLED = "CANCELLED"
    # A step waits for an approval, an event or a timer (celery_wing/waits.py); its
    # lease_deadline is then the wait's deadline (None: none), never a worker's lease.
    WAITING = "WAITING"


def dumps_json(value: Any, *, what: str) -> str:
    """Compact JSON, or a NotJSONSerializableError that names the offending value. Values
    Celery's JSON carries as tagged objects (datetime, UUID, Decimal, bytes...) are tagged
    the same way (values.py), so they read back as the values a step received. Keys keep
    the value's order, as in Celery's own JSON: sorting them cost 40 % more time on a
    step's 20 KB state, twice per step."""
    fast = _plain_json(value)
    if fast is not None:
        return fast
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False, default=tag)
    except (TypeError, ValueError) as exc:
        raise NotJSONSerializableError(
            f"{what} cannot be recorded ({exc}). Accepted: {CARRIED}, nested, as Celery's "
            "JSON carries them between steps; convert other objects before returning them."
        ) from exc


# orjson for values of plain JSON types only: anything it would write differently from the
# stdlib path below is passed through (datetimes, subclasses, dataclasses) and so refused.
_PLAIN = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS | \
    orjson.OPT_PASSTHROUGH_DATACLASS


def _plain_json(value: Any) -> str | None:
    """orjson's JSON of `value` if it reads back equal to `value`, else None (the stdlib
    path decides). About 2.5x faster on a step's 20 KB state, the read-back included. The
    read-back is what makes it exact: orjson writes a UUID as a bare string and NaN as
    null without complaint, and a tuple comes back a list; each then compares unequal and
    takes the stdlib path, which tags the UUID and refuses NaN as before."""
    try:
        raw = orjson.dumps(value, option=_PLAIN)
    except (TypeError, orjson.JSONEncodeError):
        return None  # a tag is needed, an int past 64 bits, a key that is not a str...
    return raw.decode() if orjson.loads(raw) == value else None


def loads_json(raw: str | bytes) -> Any:
    """JSON written by dumps_json(), tagged values restored."""
    return json.loads(raw, object_hook=untag)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat()


def _from_iso(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


@dataclass(frozen=True)
class ErrorInfo:
    type: str
    message: str
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> ErrorInfo | None:
        if data is None:
            return None
        return cls(type=data["type"], message=data["message"], traceback=data.get("traceback"))

    @classmethod
    def from_exception(cls, exc: BaseException, traceback: str | None = None) -> ErrorInfo:
        return cls(type=type(exc).__name__, message=str(exc), traceback=traceback)


# Where a node keeps its encoded JSON (instance __dict__, outside the dataclass fields, so
# equality and replace() ignore it).
_JSON = "_encoded_json"
_INPUT_JSON = "_encoded_input_json"


@dataclass(frozen=True)
class ExecutionNode:
    """One step of one agent execution, as one immutable version.

    `checkpoint` is the encoded state blob (see codec.py); it is not part of `to_dict`
    because it is binary: stores keep it beside the JSON.

    A version's JSON is encoded once and kept (the engine measures it, the store writes it),
    and a next version made by `evolve()` reuses the encoded input when the input is the
    same: a step's SUCCESS repeats the input of its RUNNING version. So treat the dicts of
    a node as read-only once it is saved.
    """

    execution_id: str
    type: NodeType
    id: str = field(default_factory=new_id)
    parent_id: str | None = None
    seq: int = 0
    status: Status = Status.PENDING
    created_at: datetime = field(default_factory=utcnow)
    completed_at: datetime | None = None
    input: Any = None
    output: Any = None
    error: ErrorInfo | None = None
    cost_tokens: int | None = None
    latency_ms: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    checkpoint: bytes | None = None

    def __post_init__(self) -> None:
        # Accept the raw strings stores hand back, but reject anything else loudly.
        try:
            object.__setattr__(self, "type", NodeType(self.type))
            object.__setattr__(self, "status", Status(self.status))
        except ValueError as exc:
            raise RecordError(
                f"Node {self.id}: {exc}. Accepted types: {[t.value for t in NodeType]}; "
                f"statuses: {[s.value for s in Status]}."
            ) from exc
        if not isinstance(self.seq, int) or self.seq < 0:
            raise RecordError(f"Node {self.id}: seq must be an int >= 0, got {self.seq!r}.")
        if self.checkpoint is not None and not isinstance(self.checkpoint, bytes):
            raise RecordError(
                f"Node {self.id}: checkpoint must be bytes (an encoded blob), "
                f"got {type(self.checkpoint).__name__}."
            )

    def is_idempotent(self) -> bool:
        """Safe to run again? An explicit metadata["idempotent"] bool wins; else TOOL is not."""
        flag = self.metadata.get(Meta.IDEMPOTENT)
        if isinstance(flag, bool):
            return flag
        return self.type is not NodeType.TOOL

    def is_supersedable(self) -> bool:
        """Can a later version of this node stand in for this one in the store? A RUNNING
        version tells a reader nothing its outcome does not (the outcome keeps its start,
        attempt, owner and request), except for a non-idempotent step, whose RUNNING version
        is the evidence that its side effect may have started, and a version carrying a
        checkpoint. Storing such a version once saves storing the step's input twice."""
        return self.status is Status.RUNNING and self.is_idempotent() \
            and self.checkpoint is None

    def evolve(self, **changes: Any) -> ExecutionNode:
        """The next version of this node (the log is append-only)."""
        nxt = dataclasses.replace(self, **changes)
        if "input" not in changes and _INPUT_JSON in self.__dict__:
            nxt.__dict__[_INPUT_JSON] = self.__dict__[_INPUT_JSON]
        if changes.keys() <= {"checkpoint"} and _JSON in self.__dict__:
            nxt.__dict__[_JSON] = self.__dict__[_JSON]  # the blob is not part of the JSON
        return nxt

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "parent_id": self.parent_id,
            "execution_id": self.execution_id,
            "seq": self.seq,
            "type": self.type.value,
            "status": self.status.value,
            "created_at": _iso(self.created_at),
            "completed_at": _iso(self.completed_at),
            "input": self.input,
            "output": self.output,
            "error": self.error.to_dict() if self.error else None,
            "cost_tokens": self.cost_tokens,
            "latency_ms": self.latency_ms,
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], checkpoint: bytes | None = None) -> ExecutionNode:
        try:
            return cls(
                execution_id=data["execution_id"],
                type=data["type"],
                id=data["id"],
                parent_id=data.get("parent_id"),
                seq=data.get("seq", 0),
                status=data["status"],
                created_at=_from_iso(data.get("created_at")) or utcnow(),
                completed_at=_from_iso(data.get("completed_at")),
                input=data.get("input"),
                output=data.get("output"),
                error=ErrorInfo.from_dict(data.get("error")),
                cost_tokens=data.get("cost_tokens"),
                latency_ms=data.get("latency_ms"),
                metadata=data.get("metadata") or {},
                checkpoint=checkpoint,
            )
        except KeyError as exc:
            raise RecordError(
                f"Node record is missing the field {exc.args[0]!r}: {data!r}") from exc

    def to_json(self) -> str:
        """The record as compact JSON (input first), encoded once per version."""
        cached: str | None = self.__dict__.get(_JSON)
        if cached is None:
            what = f"Node {self.id} (input/output/metadata)"
            input_json = self.__dict__.get(_INPUT_JSON)
            if input_json is None:
                input_json = self.__dict__[_INPUT_JSON] = dumps_json(self.input, what=what)
            rest = self.to_dict()
            del rest["input"]
            tail = dumps_json(rest, what=what)[1:]  # the other fields, without the "{"
            cached = self.__dict__[_JSON] = f'{{"input":{input_json},{tail}'
        return cached

    @classmethod
    def from_json(cls, raw: str | bytes, checkpoint: bytes | None = None) -> ExecutionNode:
        try:
            data = loads_json(raw)
        except ValueError as exc:
            raise RecordError(f"Node record is not valid JSON: {exc}") from exc
        return cls.from_dict(data, checkpoint=checkpoint)


@dataclass(frozen=True)
class Execution:
    """Summary of one execution: what recovery reads to find orphans without scanning nodes.

    `lease_deadline` is epoch seconds: while a step runs, its worker keeps pushing it forward;
    once it is in the past the owner is presumed dead. `fence` grows by one on each claim, so
    a stale owner (or Celery redelivering an old message) can tell it is no longer current.
    """

    id: str
    status: ExecutionStatus = ExecutionStatus.RUNNING
    current_node_id: str | None = None
    lease_owner: str | None = None
    lease_deadline: float | None = None
    fence: int = 0
    attempts: int = 0
    reason: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    updated_at: datetime = field(default_factory=utcnow)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "status", ExecutionStatus(self.status))
        except ValueError as exc:
            raise RecordError(
                f"Execution {self.id}: {exc}. Accepted: {[s.value for s in ExecutionStatus]}."
            ) from exc

    def evolve(self, **changes: Any) -> Execution:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "status": self.status.value,
            "current_node_id": self.current_node_id,
            "lease_owner": self.lease_owner,
            "lease_deadline": self.lease_deadline,
            "fence": self.fence,
            "attempts": self.attempts,
            "reason": self.reason,
            "created_at": _iso(self.created_at),
            "updated_at": _iso(self.updated_at),
            "metadata": self.metadata,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Execution:
        try:
            return cls(
                id=data["id"],
                status=data.get("status", ExecutionStatus.RUNNING),
                current_node_id=data.get("current_node_id"),
                lease_owner=data.get("lease_owner"),
                lease_deadline=data.get("lease_deadline"),
                fence=int(data.get("fence") or 0),
                attempts=int(data.get("attempts") or 0),
                reason=data.get("reason"),
                created_at=_from_iso(data.get("created_at")) or utcnow(),
                updated_at=_from_iso(data.get("updated_at")) or utcnow(),
                metadata=data.get("metadata") or {},
            )
        except KeyError as exc:
            raise RecordError(f"Execution record is missing {exc.args[0]!r}: {data!r}") from exc

    def to_json(self) -> str:
        return dumps_json(self.to_dict(), what=f"Execution {self.id} metadata")
