"""One exception tree. Errors the caller caused also subclass ValueError or TypeError.

Every error pickles (Celery carries them across processes): each takes its message as
its only positional argument.
"""

from __future__ import annotations

__all__ = [
    "LivingAIError",
    "ConfigError",
    "CodecError",
    "StateTooLargeError",
    "NotJSONSerializableError",
    "RecordError",
    "StoreError",
    "StoreUnavailableError",
    "RecordRefusedError",
    "NotDurableError",
    "StepInDoubtError",
    "ResolveError",
    "ReplayError",
    "StepRefusedError",
    "FencedOutError",
    "ApprovalDenied",
    "WaitTimeout",
    "WaitError",
    "CallOrderError",
]


class LivingAIError(Exception):
    """Base of every error livingai_tasks raises."""


class ConfigError(LivingAIError, ValueError):
    """A setting, URL or argument is invalid. The message says what is accepted."""


class CodecError(LivingAIError, ValueError):
    """A checkpoint blob cannot be decoded: unknown codec, corrupt or truncated."""


class StateTooLargeError(LivingAIError, ValueError):
    """A checkpoint state is larger than `max_state_bytes` allows."""


class NotJSONSerializableError(LivingAIError, TypeError):
    """An input, output or metadata value cannot be stored as JSON."""


class RecordError(LivingAIError, ValueError):
    """A stored or handed-in record is malformed."""


class CorruptRecordError(RecordError):
    """A stored row cannot be decoded or fails its checksum; the message names its
    execution, node and store key, also kept as the attributes execution_id, node_id (None
    for an execution's own row) and key. Pickles like FencedOutError."""

    def __init__(self, message: str = "", *, execution_id: str = "unknown",
                 node_id: str | None = None, key: str = "") -> None:
        super().__init__(message)
        self.execution_id = execution_id
        self.node_id = node_id
        self.key = key

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), self.args, self.__dict__)


class StoreError(LivingAIError):
    """The store failed an operation."""


class StoreUnavailableError(StoreError):
    """The store's server cannot be reached (down, refused, timed out)."""


class RecordRefusedError(StoreError):
    """The store refused this record for its content (a NUL in text, a number out of
    range, a key too large, a value of the wrong type): retrying the same record cannot
    help, unlike StoreUnavailableError. The writer sanitises or sets the record aside."""


class NotDurableError(LivingAIError):
    """A write that had to be durable before going on did not become durable in time.
    `still_queued`: the write was not dropped nor rejected; it lands when the store answers."""

    def __init__(self, message: str, *, still_queued: bool = False) -> None:
        super().__init__(message)
        self.still_queued = still_queued


class StepInDoubtError(LivingAIError):
    """A non-idempotent step may already have run; it is held for a decision, not re-run."""


class ResolveError(LivingAIError, ValueError):
    """An operator's resolve request does not fit the node it names."""


class ReplayError(LivingAIError, ValueError):
    """The replay asked for does not fit the recorded execution."""


class CallOrderError(LivingAIError):
    """A step re-run made a journaled call in a different order than its record (the code
    changed, or is not deterministic): the step fails rather than return another call's
    recorded result."""


class StepRefusedError(LivingAIError):
    """A step message does not match the record of its task id (an id reused by another
    execution, a forged or stale header): refused before anything ran or was recorded."""


class FencedOutError(LivingAIError):
    """A record was refused because its execution was claimed since it was made: the
    execution's fence is newer than the record's. Not a StoreError: retrying the same
    write cannot help, the step belongs to another worker now.

    Attributes: node_id, execution_id, record_fence (the fence the record was made under)
    and current_fence (the execution's). The message is the only positional argument, so
    the error pickles; the attributes come as keywords.
    """

    def __init__(self, message: str = "", *, node_id: str = "", execution_id: str = "",
                 record_fence: int = 0, current_fence: int = 0) -> None:
        super().__init__(message)
        self.node_id = node_id
        self.execution_id = execution_id
        self.record_fence = record_fence
        self.current_fence = current_fence

    def __reduce__(self) -> tuple[object, ...]:
        # Exception pickles args alone; the keywords travel in the state.
        return (type(self), self.args, self.__dict__)


class ApprovalDenied(LivingAIError):
    """An approval gate's tool was denied (or no decision came before its deadline): the
    step fails with it, and the chain's error handling (link_error) sees it."""


class WaitTimeout(LivingAIError):
    """lai.wait_for() reached its timeout before the event came; the step may catch it."""


class WaitError(LivingAIError, ValueError):
    """A wait, send or approval request that does not fit the execution or step it names,
    or a wait used where it is not allowed."""
