"""What a running step knows about itself, and the helpers a step body calls.

Celery runs one task at a time per pool thread, so a thread-local "current step" is exact
for prefork, threads and solo pools. The same thread-local carries the identity `start()`
(and recovery) give the first step(s) they publish.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from ..codec import decode
from ..errors import CodecError, ConfigError, CorruptRecordError, LivingAIError
from ..nodes import ExecutionNode, dumps_json, loads_json
from . import runtime
from .messages import StepIdentity

__all__ = [
    "checkpoint",
    "last_state",
    "idempotency_key",
    "idempotency_key_of",
    "current_execution_id",
    "Decision",
    "StepContext",
    "publish_identity",
]


class Decision(str, Enum):
    """What the entry check decided the step body should do; the task's __call__ obeys it."""

    RUN = "RUN"  # run the body
    REPLAY = "REPLAY"  # already SUCCESS: return the recorded output, do not run
    RECONCILE = "RECONCILE"  # outcome unknown, a reconcile callback will decide
    IN_DOUBT = "IN_DOUBT"  # outcome unknown, no way to tell: hold for an operator
    STALE = "STALE"  # an older copy of a step that was resumed elsewhere: do nothing
    NO_INTENT = "NO_INTENT"  # the intent record could not be made durable: do not run
    REFUSED = "REFUSED"  # the message does not match the record of its task id
    STORE_DOWN = "STORE_DOWN"  # the store is unreachable: back to the broker, run later
    WAIT = "WAIT"  # recorded WAITING for an approval: end without running (waits.py)
    DENIED = "DENIED"  # its approval was denied (or timed out): fail with ApprovalDenied


@dataclass
class StepContext:
    node: ExecutionNode  # the RUNNING version (or the recorded one for REPLAY/IN_DOUBT)
    decision: Decision = Decision.RUN
    fence: int = 0
    reason: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def execution_id(self) -> str:
        return self.node.execution_id

    @property
    def identity(self) -> StepIdentity:
        return StepIdentity.of_node(self.node, self.fence)


# The key of StepContext.extra naming the journaled call running now (journal.py sets it).
CALL_ID = "call_id"


class _Local(threading.local):
    step: StepContext | None = None
    publish: StepIdentity | None = None  # set by start() and recovery while they publish


local = _Local()
log = logging.getLogger("livingai_tasks")


def publish_identity(task_id: str | None) -> StepIdentity | None:
    """The identity a step published now, from this thread, carries: the next step of the
    running step (or the step itself, for its own retry()), or what start() set; None
    outside both (a step sent on its own starts an execution of its own)."""
    step = local.step
    if step is not None:
        return step.identity.for_publish(step.node.id, task_id)
    return local.publish


def _step(what: str) -> StepContext:
    ctx = local.step
    if ctx is None:
        raise ConfigError(
            f"livingai_tasks.{what}() works only inside a running @agent_step or @tool_step "
            "(and after livingai_tasks.install(app))."
        )
    return ctx


def current_execution_id() -> str | None:
    """The execution the current step belongs to, or None outside a step."""
    ctx = local.step
    return ctx.execution_id if ctx else None


def idempotency_key() -> str:
    """A key for external APIs that accept one: the same for every attempt of this step
    (retries, redeliveries and recovery keep the execution id and node id). It is what makes
    the one case fencing cannot close safe: a worker paused inside a call that wakes after
    another attempt made the same call sends the same key. Inside a journaled call
    (lai.call) it is that call's key: stable across attempts, distinct per call."""
    ctx = _step("idempotency_key")
    # Inside a journaled call (celery_wing/journal.py): the call's own key.
    return idempotency_key_of(ctx.execution_id, str(ctx.extra.get(CALL_ID) or ctx.node.id))


def idempotency_key_of(execution_id: str, node_id: str) -> str:
    """The idempotency key of a recorded step, from outside it (an audit, a reconcile job)."""
    digest = hashlib.sha256(f"{execution_id}:{node_id}".encode()).hexdigest()
    return f"lai-{digest[:40]}"


def checkpoint(state: Any) -> str:
    """Save this step's state mid-way (JSON-serializable); a re-run reads it with
    last_state(). Never holds the step longer than the budget. Returns what became of it
    (SaveResult.outcome): "durable" (the store has it), "queued" (in this process's queue,
    retried until the store has it), "spilled" (the queue was full: it waits in the spill
    file on local disk) or "dropped" (only under queue_full="drop": lost, counted).
    Changed from a bool (True only for durable): every outcome string is truthy, so compare
    with == "durable" where the old code tested the truth of the result.
    Raises NotJSONSerializableError or StateTooLargeError for bad state."""
    ctx = _step("checkpoint")
    raw = dumps_json(state, what=f"Checkpoint state of node {ctx.node.id}").encode()
    return runtime.get().engine.save(ctx.node, raw).outcome


def last_state() -> Any:
    """The newest state this step saved with checkpoint() in an earlier attempt, or None.
    A checkpoint that cannot be decoded (corrupt) is skipped with a warning for the newest
    one that can."""
    ctx = _step("last_state")
    engine = runtime.get().engine
    try:
        found = engine.latest(ctx.execution_id)  # usually this step's own: one cheap read
    except (CodecError, CorruptRecordError) as exc:
        # A damaged blob, or (Redis) a damaged copy of the latest version: the versions
        # themselves are read one by one below.
        log.warning("livingai_tasks: %s; reading the step's earlier checkpoints", exc)
        found = None
    else:
        if found is None:
            return None  # the execution has no checkpoint at all
    if found is None or found[0].id != ctx.node.id:
        # Read from the store itself: an earlier attempt ran in another process.
        found = _newest_decodable(engine.store.node_versions(ctx.node.id))
    if found is None or found[1] is None:
        return None
    try:
        return loads_json(found[1])
    except ValueError as exc:
        raise LivingAIError(f"Checkpoint of node {ctx.node.id} is not JSON: {exc}") from exc


def _newest_decodable(versions: list[ExecutionNode]) -> tuple[ExecutionNode, bytes] | None:
    for version in reversed(versions):
        if version.checkpoint is None:
            continue
        try:
            return version, decode(version.checkpoint, node_id=version.id)
        except CodecError as exc:
            log.warning("livingai_tasks: %s; trying the one before it", exc)
    return None
