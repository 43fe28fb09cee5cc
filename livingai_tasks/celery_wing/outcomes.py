"""A step's outcome on record: SUCCESS (and whether the chain may go on), a replayed
step, FAILED, RETRYING, CRASHED, CANCELLED, or IN_DOUBT after a revoke killed a tool.

Like the entry check (lifecycle.py), reads that must see other processes' writes go to the
store itself: a group's siblings and sizes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ..errors import FencedOutError, NotDurableError, NotJSONSerializableError
from ..nodes import ErrorInfo, ExecutionNode, ExecutionStatus, Meta, Status, utcnow
from ..stores import IF_FENCE, fence_of
from . import context, runtime
from .context import StepContext
from .lifecycle import StepSpec
from .messages import StepIdentity

__all__ = ["record_success", "record_replayed", "finish_node", "unstarted_node",
           "hold_terminated"]

log = logging.getLogger("livingai_tasks.outcomes")


def _group_finished(engine: Any, node: ExecutionNode, group_id: str) -> bool:
    """Has every member of the group finished? A member that has not started has no node
    yet, so the group's size (known when start() published the group) is needed to tell
    "all finished" from "all started so far finished"."""
    siblings = [n for n in engine.store.nodes(node.execution_id)
                if (n.metadata.get(Meta.REQUEST) or {}).get("group") == group_id]
    finished = {n.id for n in siblings if n.status.finished} | {node.id}
    execution = engine.store.get_execution(node.execution_id)
    size = (execution.metadata.get(Meta.GROUP_SIZES) or {}).get(group_id) if execution else None
    return len(finished) >= len({n.id for n in siblings} | {node.id}) and \
        (size is None or len(finished) >= int(size))


def record_success(task: Any, ctx: StepContext, output: Any, latency_ms: float,
                   *, reconciled: bool = False) -> bool:
    """SUCCESS version of the running node (called from StepTask.__call__). False when the
    chain must not go on: a non-idempotent step's SUCCESS is not durable. Raises only
    NotJSONSerializableError, for an output that cannot be recorded (the step fails)."""
    try:
        return _record_success(task, ctx, output, latency_ms, reconciled)
    except NotJSONSerializableError:
        raise  # the step fails with it: an output nobody can carry is no success
    except Exception:  # noqa: BLE001
        log.exception("livingai_tasks: recording the output of %s failed", ctx.node.id)
        return ctx.node.is_idempotent()


def _record_success(task: Any, ctx: StepContext, output: Any, latency_ms: float,
                    reconciled: bool) -> bool:
    engine = runtime.get().engine
    metadata = dict(ctx.node.metadata)
    if reconciled:
        metadata[Meta.RECONCILED] = True
    done = ctx.node.evolve(status=Status.SUCCESS, output=output, completed_at=utcnow(),
                           latency_ms=int(round(latency_ms)), checkpoint=None, metadata=metadata)
    # Encoded once (the engine and the store reuse it). An output Celery's JSON cannot carry
    # either raises here, before anything records the step as done.
    done.to_json()
    ctx.node = done
    try:
        # A group member waits: the last member to finish reads its siblings' records.
        engine.save(done, durable=not done.is_idempotent(), wait=bool(task.request.group))
    except FencedOutError as exc:
        log.warning("livingai_tasks: SUCCESS of %s (%s) was refused: %s. This attempt lost its "
                    "execution (paused past its lease?): the chain goes on from the attempt "
                    "that took over, not from here", task.name, done.id, exc)
        return False
    except NotDurableError as exc:
        log.warning("livingai_tasks: SUCCESS of tool %s (%s) is not durable (%s): the chain "
                    "stops here; the record stays queued, and recovery goes on from it once "
                    "it lands", task.name, done.id, exc)
        # Queued behind the SUCCESS, so recovery looks at the execution once it has landed.
        engine.update_execution(done.execution_id, wait=False, lease_deadline=time.time(),
                                if_fence=ctx.fence)
        return False
    if engine.lost(done.id):
        log.warning("livingai_tasks: %s (%s) lost its execution to a newer attempt: the chain "
                    "does not go on from here", task.name, done.id)
        return False
    _maybe_complete(task, done)
    return True


def record_replayed(task: Any, ctx: StepContext) -> None:
    """A redelivered or resumed step that had already succeeded: nothing to write, but if it
    is the last step the execution is complete."""
    try:
        engine = runtime.get().engine
        engine.metrics.incr("steps_replayed")
        _maybe_complete(task, ctx.node)
    except Exception:  # noqa: BLE001
        log.exception("livingai_tasks: replay bookkeeping of %s failed", ctx.node.id)


def _maybe_complete(task: Any, node: ExecutionNode) -> None:
    request = task.request
    if request.chain or request.callbacks or request.chord:
        return  # more steps follow this one
    engine = runtime.get().engine
    if request.group and not _group_finished(engine, node, request.group):
        return  # the last member to finish completes the execution
    engine.update_execution(node.execution_id, wait=False, status=ExecutionStatus.COMPLETED,
                            current_node_id=node.id, lease_deadline=None,
                            if_fence=fence_of(node))


def unstarted_node(task_id: str, spec: StepSpec, request: Any,
                   task_name: str) -> ExecutionNode | None:
    """A stand-in for a step that never ran (revoked while queued), from its headers: there
    is no RUNNING version to evolve."""
    identity = StepIdentity.from_request(request)
    if identity is None:
        return None
    return ExecutionNode(id=task_id, execution_id=identity.execution_id,
                         parent_id=identity.parent_id, type=spec.type, seq=identity.seq,
                         metadata={Meta.TASK: task_name})


def finish_node(task_id: str, status: Status, error: ErrorInfo | None,
                execution_status: ExecutionStatus | None, *, expire_lease: bool = False,
                durable: bool = False, unstarted: ExecutionNode | None = None,
                extra: dict[str, Any] | None = None) -> None:
    """A final version of a step's node, and the change of its execution it implies."""
    engine = runtime.get().engine
    ctx = context.local.step
    node = ctx.node if ctx is not None and ctx.node.id == task_id else engine.get_node(task_id)
    node = node or unstarted
    if node is None or not node.execution_id:
        return  # its RUNNING version never became durable: the lease expiry covers it
    if node.status is Status.SUCCESS and status in (Status.CRASHED, Status.FAILED):
        # Its SUCCESS is on record (the process died, or Celery failed it, after that):
        # the record stands. Only the lease goes, so recovery re-drives a continuation
        # that may never have been published.
        execution_status, expire_lease = None, True
    else:
        engine.save(node.evolve(status=status, error=error, completed_at=utcnow(),
                                checkpoint=None, metadata={**node.metadata, **(extra or {})}),
                    durable=durable)
    changes: dict[str, Any] = {}
    if execution_status is not None:
        what = error.message if error else status.value
        changes.update(status=execution_status, lease_deadline=None,
                       reason=f"{node.metadata.get(Meta.TASK)}: {what}")
    if expire_lease:
        changes.update(lease_deadline=time.time())  # the reaper looks at it on its next tick
    if changes:
        # Made under the node's fence: a crash or failure of an attempt recovery has since
        # replaced must not end the execution.
        engine.update_execution(node.execution_id, durable=durable,
                                **{**changes, IF_FENCE: fence_of(node)})


def hold_terminated(task_id: str) -> None:
    """A non-idempotent step killed by revoke(terminate=True) while it ran: IN_DOUBT, for a
    reconcile or an operator to decide, like a tool whose worker died."""
    engine = runtime.get().engine
    node = engine.get_node(task_id)
    if node is None or not node.execution_id:
        return  # never recorded as started: it did not run
    reason = (f"tool step {node.metadata.get(Meta.TASK)} ({task_id}) was terminated by a revoke "
              "while it ran: the side effect may or may not have happened")
    engine.save(node.evolve(status=Status.IN_DOUBT, error=ErrorInfo("Revoked", "terminated"),
                            checkpoint=None,
                            metadata={**node.metadata, Meta.IN_DOUBT_REASON: reason}),
                durable=True)
    engine.update_execution(node.execution_id, durable=True, status=ExecutionStatus.IN_DOUBT,
                            reason=reason, current_node_id=task_id, lease_deadline=None,
                            if_fence=fence_of(node))
    engine.metrics.incr("executions_in_doubt")
    log.warning("livingai_tasks: %s", reason)
