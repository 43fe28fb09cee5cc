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
    "NotDurableError",
    "StepInDoubtError",
    "ResolveError",
    "ReplayError",
    "StepRefusedError",
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


class StoreError(LivingAIError):
    """The store failed an operation."""


class StoreUnavailableError(StoreError):
    """The store's server cannot be reached (down, refused, timed out)."""


class NotDurableError(LivingAIError):
    """A write that had to be durable before going on did not become durable in time."""


class StepInDoubtError(LivingAIError):
    """A non-idempotent step may already have run; it is held for a decision, not re-run."""


class ResolveError(LivingAIError, ValueError):
    """An operator's resolve request does not fit the node it names."""


class ReplayError(LivingAIError, ValueError):
    """The replay asked for does not fit the recorded execution."""


class StepRefusedError(LivingAIError):
    """A step message does not match the record of its task id (an id reused by another
    execution, a forged or stale header): refused before anything ran or was recorded."""
