"""livingai_tasks: durable AI-agent steps on Celery."""

from __future__ import annotations

from .codec import Codec, decode, encode
from .errors import (
    CodecError,
    ConfigError,
    LivingAIError,
    NotDurableError,
    NotJSONSerializableError,
    RecordError,
    StateTooLargeError,
    StepInDoubtError,
    StoreError,
    StoreUnavailableError,
)
from .nodes import ErrorInfo, Execution, ExecutionNode, ExecutionStatus, NodeType, Status
from .stores import Store, open_store

__version__ = "0.1.0"

__all__ = [
    # the record
    "ExecutionNode", "NodeType", "Status", "ErrorInfo", "Execution", "ExecutionStatus",
    # blobs
    "Codec", "encode", "decode",
    # stores
    "Store", "open_store",
    # errors
    "LivingAIError", "ConfigError", "CodecError", "StateTooLargeError",
    "NotJSONSerializableError", "RecordError", "StoreError", "StoreUnavailableError",
    "NotDurableError", "StepInDoubtError",
]
