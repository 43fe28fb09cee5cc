"""livingai_tasks: durable AI-agent steps on Celery.

    import livingai_tasks as lai
    lai.install(app, store="postgresql+psycopg://postgres@127.0.0.1/test")

    @lai.agent_step(app)
    def plan(goal: str) -> dict: ...

    @lai.tool_step(app)                # non-idempotent: never run twice
    def charge_card(plan: dict) -> dict: ...

    run = lai.start(chain(plan.s("book a flight"), charge_card.s()))
"""

from __future__ import annotations

from .celery_wing.context import checkpoint, current_execution_id, idempotency_key, last_state
from .celery_wing.install import Run, install, resolve, start
from .celery_wing.journal import call, journaled
from .celery_wing.steps import Reconciled, StepTask, agent_step, tool_step
from .celery_wing.waits import sleep, wait_for
from .celery_wing.wake import approve, cancel, deny, send
from .codec import Codec, decode, encode
from .engine import CheckpointEngine, SaveResult
from .errors import (
    ApprovalDenied,
    CallOrderError,
    CodecError,
    ConfigError,
    FencedOutError,
    LivingAIError,
    NotDurableError,
    NotJSONSerializableError,
    RecordError,
    ReplayError,
    ResolveError,
    StateTooLargeError,
    StepInDoubtError,
    StepRefusedError,
    StoreError,
    StoreUnavailableError,
    WaitError,
    WaitTimeout,
)
from .metrics import Metrics
from .nodes import ErrorInfo, Execution, ExecutionNode, ExecutionStatus, NodeType, Status
from .recovery import Action, RecoveryEngine, RecoveryPlan
from .settings import Settings
from .stores import Store, open_store

__version__ = "0.1.0"

__all__ = [
    # Celery wiring and steps
    "install", "start", "resolve", "Run", "agent_step", "tool_step", "StepTask", "Reconciled",
    "Settings",
    # durable waits
    "approve", "deny", "send", "cancel", "wait_for", "sleep",
    # inside a step
    "checkpoint", "last_state", "idempotency_key", "current_execution_id", "call", "journaled",
    # the record
    "ExecutionNode", "NodeType", "Status", "ErrorInfo", "Execution", "ExecutionStatus",
    # engine, blobs, metrics
    "CheckpointEngine", "SaveResult", "Codec", "encode", "decode", "Metrics",
    # recovery
    "RecoveryEngine", "RecoveryPlan", "Action",
    # stores
    "Store", "open_store",
    # errors
    "LivingAIError", "ConfigError", "CodecError", "StateTooLargeError",
    "NotJSONSerializableError", "RecordError", "StoreError", "StoreUnavailableError",
    "NotDurableError", "StepInDoubtError", "StepRefusedError", "FencedOutError",
    "ResolveError", "ReplayError", "ApprovalDenied", "WaitTimeout", "WaitError",
    "CallOrderError",
]
