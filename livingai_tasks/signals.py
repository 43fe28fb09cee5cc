"""Celery signal handlers that record every step as node versions.

Where each runs (measured on celery 5.5-5.7, prefork):
    before_task_publish     the publishing process (client, or the child running a step)
    task_prerun, task_retry, ordinary task_failure, task_postrun   the pool child
    task_failure(WorkerLostError), task_revoked                    the worker's main process
Handlers skip tasks that are not steps and never raise: a store outage is logged and
counted, and the engine's budget bounds how long a handler can hold a step.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import signals

from . import context, runtime
from .context import (
    HEADER_EXECUTION,
    HEADER_FENCE,
    HEADER_PARENT,
    HEADER_SEQ,
    Decision,
    StepContext,
)
from .errors import NotDurableError, NotJSONSerializableError, StepInDoubtError, StoreError
from .nodes import (
    ErrorInfo,
    Execution,
    ExecutionNode,
    ExecutionStatus,
    NodeType,
    Status,
    utcnow,
)
from .steps import StepSpec, spec_of

__all__ = ["connect", "record_success", "record_replayed", "saved_request"]

log = logging.getLogger("livingai_tasks.signals")

# What recovery needs to publish a step again with the same identity and continuation.
_REQUEST_FIELDS = ("chain", "callbacks", "errbacks", "chord", "group", "group_index",
                   "root_id", "parent_id", "retries", "hostname", "reply_to", "correlation_id")


def _guarded(fn: Any) -> Any:
    """A receiver that logs and counts instead of raising (Celery would only log it, but
    a raise in before_task_publish would fail the publish)."""

    def receiver(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except Exception:  # noqa: BLE001
            log.exception("livingai_tasks: %s failed; the step goes on unrecorded", fn.__name__)
            if runtime.is_configured():
                runtime.get().engine.metrics.incr("signal_errors")

    receiver.__name__ = fn.__name__
    return receiver


def headers_of(request: Any) -> dict[str, Any]:
    """Our headers from a task request: top-level attributes for a worker delivery,
    request.headers for eager apply(headers=...)."""
    found = {}
    nested = getattr(request, "headers", None) or {}
    for name in (HEADER_EXECUTION, HEADER_PARENT, HEADER_SEQ, HEADER_FENCE):
        value = getattr(request, name, None)
        if value is None:
            value = nested.get(name)
        if value is not None:
            found[name] = value
    return found


def saved_request(request: Any, task_name: str) -> dict[str, Any]:
    saved: dict[str, Any] = {"task": task_name}
    for name in _REQUEST_FIELDS:
        value = getattr(request, name, None)
        if value not in (None, [], {}):
            saved[name] = value
    info = getattr(request, "delivery_info", None) or {}
    saved["delivery_info"] = {k: info.get(k) for k in ("exchange", "routing_key", "priority",
                                                        "redelivered") if k in info}
    return saved


# -- before_task_publish: carry the execution to the next step -------------------------


def _on_publish(sender: str | None = None, headers: dict[str, Any] | None = None,
                **_: Any) -> None:
    """For steps sent by name (app.send_task), which bypass StepTask.apply_async."""
    spec = spec_of(sender or "")
    if headers is None or spec is None:
        return
    if HEADER_EXECUTION not in headers:  # else chosen already (apply_async, recovery)
        inject_identity(headers, headers.get("id"))
    if HEADER_EXECUTION in headers and _TAG not in str(headers.get("kwargsrepr")):
        headers["kwargsrepr"] = tag_kwargsrepr(headers.get("kwargsrepr") or "{}", headers,
                                               spec.type)


_TAG = "[livingai execution="


def tag_kwargsrepr(shown: str, headers: dict[str, Any], node_type: NodeType) -> str:
    """Flower shows only what Celery's events carry; kwargsrepr is one of them, so the
    execution, seq and step type become readable in its task list and API."""
    return (f"{shown} {_TAG}{headers[HEADER_EXECUTION]} seq={headers.get(HEADER_SEQ)} "
            f"type={node_type.value}]")


def inject_identity(headers: dict[str, Any], task_id: str | None) -> None:
    """Add execution, parent, seq and fence headers for a step about to be published from
    inside a running step, or from start(). Leaves `headers` alone anywhere else."""
    if HEADER_EXECUTION in headers:
        return  # chosen already (recovery, resolve, or the caller)
    step = context.local.step
    if step is not None:
        node = step.node
        if task_id == node.id:  # Task.retry(): the same step again
            parent, seq = node.parent_id, node.seq
        else:
            parent, seq = node.id, node.seq + 1
        headers.update({HEADER_EXECUTION: node.execution_id, HEADER_PARENT: parent,
                        HEADER_SEQ: seq, HEADER_FENCE: step.fence})
        return
    pub = context.local.publish
    if pub is not None:
        headers.update({HEADER_EXECUTION: pub.execution_id, HEADER_PARENT: pub.parent_id,
                        HEADER_SEQ: pub.seq, HEADER_FENCE: pub.fence})


# -- task_prerun: decide, then write the RUNNING version ------------------------------


def _on_prerun(sender: Any = None, task_id: str | None = None, task: Any = None,
               args: Any = None, kwargs: Any = None, **_: Any) -> None:
    spec = spec_of(task)
    context.local.step = None
    if spec is None or task_id is None:
        return
    try:
        context.local.step = begin_step(task, spec, task_id, list(args or ()), dict(kwargs or {}))
    except Exception as exc:  # noqa: BLE001
        log.exception("livingai_tasks: could not record the start of %s (%s)", task.name, task_id)
        if spec.idempotent:
            return  # safe to run unrecorded; the lease expiry still covers a crash
        # A side effect must not run without evidence that it started.
        placeholder = ExecutionNode(id=task_id, execution_id="", type=spec.type)
        context.local.step = StepContext(placeholder, Decision.NO_INTENT, 0,
                                         f"tool step {task.name} ({task_id}) did not run: the "
                                         f"store could not record its start ({exc})")


def _identity(task: Any, task_id: str) -> tuple[str, str | None, int, int, bool]:
    """(execution id, parent node id, seq, fence, is_new_execution) of a starting step."""
    hdr = headers_of(task.request)
    if HEADER_EXECUTION in hdr:
        return (str(hdr[HEADER_EXECUTION]), hdr.get(HEADER_PARENT), int(hdr.get(HEADER_SEQ, 1)),
                int(hdr.get(HEADER_FENCE, 0)), False)
    pub = context.local.publish
    if pub is not None:  # eager mode inside start(): steps run one after another, here
        identity = (pub.execution_id, pub.parent_id, pub.seq, pub.fence, False)
        pub.parent_id, pub.seq = task_id, pub.seq + 1
        return identity
    # A step sent without start(): the canvas root names the execution, so every step of
    # the same canvas (and every redelivery) lands in the same one.
    return (task.request.root_id or task_id, None, 1, 0, True)


def begin_step(task: Any, spec: StepSpec, task_id: str, args: list[Any],
               kwargs: dict[str, Any]) -> StepContext:
    rt = runtime.get()
    engine = rt.engine
    execution_id, parent_id, seq, fence, new_execution = _identity(task, task_id)
    if new_execution:
        engine.create_execution(Execution(id=execution_id, metadata={"root_task": task.name}))
    identity = (execution_id, parent_id, seq, fence)
    if engine.can_append_if_new(task_id):
        # The usual case, a first delivery: the entry check and the RUNNING record with its
        # lease in one round trip. Anything else goes the long way, with what was found.
        first = _running_node(rt, task, spec, task_id, identity, args, kwargs, None)
        existing = _first_record(engine, first, _lease(rt, task_id))
        if existing == first:
            return _started(rt, StepContext(first, Decision.RUN, fence, ""))
    else:
        existing = _recorded(engine, task_id)
    decision, reason = _decide(rt, spec, existing, fence)
    if existing is not None and decision in (Decision.REPLAY, Decision.STALE):
        return StepContext(existing, decision, fence, reason)
    if existing is not None and decision is Decision.IN_DOUBT:
        held = existing.evolve(status=Status.IN_DOUBT,
                               metadata={**existing.metadata, "in_doubt_reason": reason})
        engine.save(held, durable=True)
        engine.update_execution(execution_id, durable=True, status=ExecutionStatus.IN_DOUBT,
                                reason=reason, current_node_id=task_id, lease_deadline=None)
        return StepContext(held, decision, fence, reason)

    node = _running_node(rt, task, spec, task_id, identity, args, kwargs, existing)
    ctx = StepContext(node, decision, fence, reason)
    try:
        # A non-idempotent tool leaves durable evidence before it runs, so a crash during
        # it can never be mistaken for "never started".
        # Bookkeeping of an idempotent step does not wait for the store: if this process
        # dies before it lands, the lease expiry (or the stuck-step check) covers it.
        engine.save(node, durable=not node.is_idempotent(), wait=False)
    except NotDurableError as exc:
        ctx.decision = Decision.NO_INTENT
        ctx.reason = (f"step {task.name} ({task_id}) did not run: its intent record could not "
                      f"be made durable ({exc}); it is safe to retry")
        return ctx
    engine.update_execution(execution_id, wait=False, **_lease(rt, task_id))
    return _started(rt, ctx)


def _running_node(rt: runtime.Runtime, task: Any, spec: StepSpec, task_id: str,
                  identity: tuple[str, str | None, int, int], args: list[Any],
                  kwargs: dict[str, Any], existing: ExecutionNode | None) -> ExecutionNode:
    """The RUNNING version of a starting step: what recovery needs to publish it again."""
    execution_id, parent_id, seq, fence = identity
    attempt = int(existing.metadata.get("attempt", 0)) + 1 if existing else 1
    # Who recovered or resolved it stays on record; the resolution itself does not carry
    # over (a retried tool that crashes again is of unknown outcome again).
    carried = {k: v for k, v in (existing.metadata if existing else {}).items()
               if k in ("recovered_by", "recovered_at", "resolved_by", "resolved_at")}
    return ExecutionNode(
        id=task_id, execution_id=execution_id, parent_id=parent_id, seq=seq, type=spec.type,
        status=Status.RUNNING, created_at=existing.created_at if existing else utcnow(),
        input={"args": args, "kwargs": kwargs},
        metadata={"task": task.name, "idempotent": spec.idempotent, "attempt": attempt,
                  "reconcilable": spec.reconcile is not None,
                  "fence": fence, "owner": rt.owner,
                  "request": saved_request(task.request, task.name), **carried},
    )


def _lease(rt: runtime.Runtime, task_id: str) -> dict[str, Any]:
    return {"current_node_id": task_id, "lease_owner": rt.owner,
            "lease_deadline": time.time() + rt.settings.lease_s}


def _started(rt: runtime.Runtime, ctx: StepContext) -> StepContext:
    rt.heartbeat.add(ctx.node.execution_id)
    ctx.extra["heartbeat"] = True
    return ctx


def _first_record(engine: Any, node: ExecutionNode,
                  lease: dict[str, Any]) -> ExecutionNode | None:
    """Write `node` as the step's first record unless the store has one: returns `node` if
    it is now stored, else the store's latest version (None: none, or it cannot be read)."""
    try:
        existing: ExecutionNode | None = engine.append_if_new(node, **lease)
    except StoreError:
        # Landed or not (the reply may be what was lost): the record says which.
        return _recorded(engine, node.id)
    return node if existing is None else existing


def _recorded(engine: Any, task_id: str) -> ExecutionNode | None:
    """The node as the store has it: the entry check must see what other processes wrote
    (an operator's resolution, recovery's fence), not this process's cached copy."""
    try:
        node: ExecutionNode | None = engine.store.get_node(task_id)
        return node
    except StoreError:
        engine.metrics.incr("entry_check_cache_fallbacks")
        try:
            cached: ExecutionNode | None = engine.get_node(task_id)
            return cached
        except StoreError:
            return None


def _decide(rt: runtime.Runtime, spec: StepSpec, existing: ExecutionNode | None,
            fence: int) -> tuple[Decision, str]:
    if existing is None:
        return Decision.RUN, ""
    if fence < int(existing.metadata.get("fence", 0)):
        return Decision.STALE, "an older copy of a step that recovery resumed"
    status = existing.status
    if status in (Status.SUCCESS, Status.SKIPPED):
        return Decision.REPLAY, "already done: its recorded output is returned"
    if status is Status.IN_DOUBT:
        if existing.metadata.get("resolution") == "retry":
            return Decision.RUN, "an operator chose to run it again"
        return Decision.IN_DOUBT, str(existing.metadata.get("in_doubt_reason", "held"))
    if status is Status.RUNNING and existing.metadata.get("owner") != rt.owner:
        execution = rt.engine.store.get_execution(existing.execution_id)
        if execution and execution.lease_deadline and execution.lease_deadline > time.time():
            return Decision.STALE, "a duplicate delivery while the step runs elsewhere"
    if status in (Status.RUNNING, Status.CRASHED) and not existing.is_idempotent():
        why = (f"tool step {existing.metadata.get('task')} ({existing.id}) started in attempt "
               f"{existing.metadata.get('attempt')} and its worker died before it finished: "
               "the side effect may or may not have happened")
        if spec.reconcile is not None:
            return Decision.RECONCILE, why
        return Decision.IN_DOUBT, why
    return Decision.RUN, ""


# -- outcomes --------------------------------------------------------------------------


def record_success(task: Any, ctx: StepContext, output: Any, latency_ms: float,
                   *, reconciled: bool = False) -> None:
    """SUCCESS version of the running node (called from StepTask.__call__); never raises."""
    try:
        _record_success(task, ctx, output, latency_ms, reconciled)
    except Exception:  # noqa: BLE001
        log.exception("livingai_tasks: recording the output of %s failed", ctx.node.id)


def _record_success(task: Any, ctx: StepContext, output: Any, latency_ms: float,
                    reconciled: bool) -> None:
    engine = runtime.get().engine
    metadata = dict(ctx.node.metadata)
    if reconciled:
        metadata["reconciled"] = True
    done = ctx.node.evolve(status=Status.SUCCESS, output=output, completed_at=utcnow(),
                           latency_ms=int(round(latency_ms)), checkpoint=None, metadata=metadata)
    try:
        done.to_json()  # encoded once: the engine and the store reuse it
    except NotJSONSerializableError as exc:
        log.error("livingai_tasks: output of step %s (%s) is not JSON; recorded as its repr. %s",
                  task.name, ctx.node.id, exc)
        done = done.evolve(output={"repr": repr(output)[:10_000]},
                           metadata={**metadata, "output_error": str(exc)})
    ctx.node = done
    try:
        # A group member waits: the last member to finish reads its siblings' records.
        engine.save(done, durable=not done.is_idempotent(), wait=bool(task.request.group))
    except NotDurableError:
        log.warning("livingai_tasks: SUCCESS of tool %s not yet durable; it stays queued",
                    done.id)
    _maybe_complete(task, done)


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
    if request.group:
        # The last member to finish completes the execution. A member that has not started
        # has no node yet, so the group's size (known when start() published the group)
        # is needed to tell "all finished" from "all started so far finished".
        siblings = [n for n in engine.store.nodes(node.execution_id)
                    if (n.metadata.get("request") or {}).get("group") == request.group]
        finished = {n.id for n in siblings if n.status.finished} | {node.id}
        execution = engine.store.get_execution(node.execution_id)
        size = (execution.metadata.get("group_sizes") or {}).get(request.group) \
            if execution else None
        if len(finished) < len({n.id for n in siblings} | {node.id}) or \
                (size is not None and len(finished) < int(size)):
            return
    engine.update_execution(node.execution_id, wait=False, status=ExecutionStatus.COMPLETED,
                            current_node_id=node.id, lease_deadline=None)


def _finish_node(task_id: str, status: Status, error: ErrorInfo | None,
                 execution_status: ExecutionStatus | None, *, expire_lease: bool = False,
                 durable: bool = False, unstarted: ExecutionNode | None = None,
                 extra: dict[str, Any] | None = None) -> None:
    """A final version of a step's node. `unstarted` stands in for a step that never ran
    (revoked while queued): there is no RUNNING version to evolve."""
    engine = runtime.get().engine
    ctx = context.local.step
    node = ctx.node if ctx is not None and ctx.node.id == task_id else engine.get_node(task_id)
    node = node or unstarted
    if node is None or not node.execution_id:
        return  # its RUNNING version never became durable: the lease expiry covers it
    engine.save(node.evolve(status=status, error=error, completed_at=utcnow(), checkpoint=None,
                            metadata={**node.metadata, **(extra or {})}), durable=durable)
    changes: dict[str, Any] = {}
    if execution_status is not None:
        what = error.message if error else status.value
        changes.update(status=execution_status, lease_deadline=None,
                       reason=f"{node.metadata.get('task')}: {what}")
    if expire_lease:
        changes.update(lease_deadline=time.time())  # the reaper looks at it on its next tick
    if changes:
        engine.update_execution(node.execution_id, durable=durable, **changes)


def _on_failure(sender: Any = None, task_id: str | None = None, exception: Any = None,
                einfo: Any = None, **_: Any) -> None:
    if spec_of(sender) is None or task_id is None:
        return
    if isinstance(exception, (StepInDoubtError, NotDurableError)):
        if isinstance(exception, NotDurableError):
            _finish_node(task_id, Status.FAILED, ErrorInfo.from_exception(exception),
                         ExecutionStatus.FAILED)
        return  # IN_DOUBT was recorded when it was decided
    if isinstance(exception, WorkerLostError):
        # In the worker's main process: the child died mid-step. Celery acks the message
        # and fails the chain; we mark the node CRASHED and expire the lease at once so the
        # recovery task resumes it with a bounded number of attempts.
        _finish_node(task_id, Status.CRASHED, ErrorInfo.from_exception(exception), None,
                     expire_lease=True, durable=True)
        return
    trace = getattr(einfo, "traceback", None)
    _finish_node(task_id, Status.FAILED, ErrorInfo.from_exception(exception, trace),
                 ExecutionStatus.FAILED)


def _on_retry(sender: Any = None, request: Any = None, reason: Any = None, **_: Any) -> None:
    task_id = getattr(request, "id", None)
    if spec_of(sender) is None or task_id is None:
        return
    ctx = context.local.step
    if ctx is None or ctx.node.id != task_id:
        # Not the step's own retry() (that runs in the pool child, inside the step) but
        # Celery cancelling it from the main process (a broker connection lost with
        # worker_cancel_long_running_tasks_on_connection_loss): the body was killed
        # mid-way, so a side effect may have happened. The redelivered copy must treat it
        # as crashed (reconcile or hold a tool), never as a clean retry.
        _finish_node(task_id, Status.CRASHED, ErrorInfo("Cancelled", str(reason or
                     "cancelled by Celery mid-step")), None, durable=True)
        return
    error = ErrorInfo.from_exception(reason) if isinstance(reason, BaseException) else \
        ErrorInfo("Retry", str(reason))
    when = getattr(reason, "when", None)  # Retry.when: a countdown in seconds, or an ETA
    due = (when.timestamp() if isinstance(when, datetime) else
           time.time() + float(when) if isinstance(when, (int, float)) else time.time())
    _finish_node(task_id, Status.RETRYING, error, None, extra={"retry_due": due})


def _on_revoked(sender: Any = None, request: Any = None, terminated: bool = False,
                signum: Any = None, expired: bool = False, **_: Any) -> None:
    spec = spec_of(sender)
    task_id = getattr(request, "id", None) or getattr(request, "task_id", None)
    if spec is None or task_id is None:
        return
    why = "expired" if expired else ("terminated" if terminated else "revoked")
    hdr = headers_of(request)  # the Context Celery passes carries the message headers
    unstarted = None
    if HEADER_EXECUTION in hdr:
        unstarted = ExecutionNode(id=task_id, execution_id=str(hdr[HEADER_EXECUTION]),
                                  parent_id=hdr.get(HEADER_PARENT), type=spec.type,
                                  seq=int(hdr.get(HEADER_SEQ, 1)),
                                  metadata={"task": getattr(sender, "name", "")})
    _finish_node(task_id, Status.CANCELLED, ErrorInfo("Revoked", why), ExecutionStatus.CANCELLED,
                 unstarted=unstarted)


def _on_postrun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    ctx = context.local.step
    context.local.step = None
    if ctx is not None and ctx.extra.get("heartbeat"):
        runtime.get().heartbeat.remove(ctx.execution_id)


# -- process lifecycle -------------------------------------------------------------------


def _on_process_init(**_: Any) -> None:
    runtime.after_fork()
    if runtime.is_configured():
        runtime.get().engine  # noqa: B018 - build the engine (and its store) in this child


def _on_process_shutdown(**_: Any) -> None:
    if runtime.is_configured():
        runtime.get().close(timeout_s=10.0)


def _on_worker_shutdown(**_: Any) -> None:
    if runtime.is_configured() and not runtime.get().flush(10.0):
        log.warning("livingai_tasks: some records were still queued at worker shutdown")


_RECEIVERS = {
    signals.before_task_publish: _on_publish,
    signals.task_prerun: _on_prerun,
    signals.task_failure: _on_failure,
    signals.task_retry: _on_retry,
    signals.task_revoked: _on_revoked,
    signals.task_postrun: _on_postrun,
    signals.worker_process_init: _on_process_init,
    signals.worker_process_shutdown: _on_process_shutdown,
    signals.worker_shutdown: _on_worker_shutdown,
}
_connected: list[Any] = []  # strong references: Celery holds receivers weakly by default


def connect() -> None:
    """Connect every receiver once (dispatch_uid makes a second install() a no-op)."""
    for signal, handler in _RECEIVERS.items():
        receiver = _guarded(handler)
        _connected.append(receiver)
        signal.connect(receiver, weak=False, dispatch_uid=f"livingai_tasks.{handler.__name__}")
