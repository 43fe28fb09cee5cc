"""The Celery signals livingai_tasks listens to, and thin handlers that hand each to the
lifecycle (lifecycle.py) or the runtime (runtime.py).

Where each runs (measured on celery 5.5-5.7, prefork):
    before_task_publish     the publishing process (client, or the child running a step)
    task_prerun, task_retry, ordinary task_failure, task_postrun   the pool child
    task_failure(WorkerLostError), task_revoked                    the worker's main process
Handlers skip tasks that are not steps and never raise: a store outage is logged and
counted, and the engine's budget bounds how long a handler can hold a step.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from datetime import datetime
from typing import Any

from billiard.exceptions import WorkerLostError
from celery import signals

from ..errors import (
    ConfigError,
    FencedOutError,
    NotDurableError,
    StepInDoubtError,
    StepRefusedError,
)
from ..nodes import ErrorInfo, ExecutionStatus, Meta, Status
from . import context, lifecycle, outcomes, runtime, worker_metrics
from .config_guard import refuse_unsafe_serializers
from .liveness import WorkerBeat, owner_name
from .messages import HEADER_EXECUTION, StepIdentity, is_tagged, tag_kwargsrepr
from .steps import spec_of

__all__ = ["connect"]

log = logging.getLogger("livingai_tasks.signals")


def _on_publish(sender: str | None = None, headers: dict[str, Any] | None = None,
                **_: Any) -> None:
    """For steps sent by name (app.send_task), which bypass StepTask.apply_async."""
    spec = spec_of(sender or "")
    if headers is None or spec is None:
        return
    if HEADER_EXECUTION not in headers:  # else chosen already (apply_async, recovery)
        identity = context.publish_identity(headers.get("id"))
        if identity is not None:
            headers.update(identity.to_headers())
    if HEADER_EXECUTION in headers and not is_tagged(headers.get("kwargsrepr")):
        tagged = StepIdentity.from_headers(headers)
        if tagged is not None:
            headers["kwargsrepr"] = tag_kwargsrepr(headers.get("kwargsrepr") or "{}", tagged,
                                                   spec.type)


def _on_prerun(sender: Any = None, task_id: str | None = None, task: Any = None,
               args: Any = None, kwargs: Any = None, **_: Any) -> None:
    spec = spec_of(task)
    context.local.step = None
    if spec is None or task_id is None:
        return
    try:
        context.local.step = lifecycle.begin_step(task, spec, task_id, list(args or ()),
                                                  dict(kwargs or {}))
    except Exception as exc:  # noqa: BLE001
        log.exception("livingai_tasks: could not record the start of %s (%s)", task.name, task_id)
        context.local.step = lifecycle.refused_start(task, spec, task_id, exc)


def _on_failure(sender: Any = None, task_id: str | None = None, exception: Any = None,
                einfo: Any = None, **_: Any) -> None:
    spec = spec_of(sender)
    if spec is None or task_id is None:
        return
    if isinstance(exception, (StepInDoubtError, StepRefusedError, FencedOutError)):
        # IN_DOUBT was recorded when it was decided; a refused message, or a step whose
        # execution was taken over, has nothing of its own to record.
        return
    if isinstance(exception, NotDurableError):
        outcomes.finish_node(task_id, Status.FAILED, ErrorInfo.from_exception(exception),
                              ExecutionStatus.FAILED)
        return
    if isinstance(exception, WorkerLostError):
        # In the worker's main process: the child died mid-step. Celery acks the message
        # and fails the chain; we mark the node CRASHED and expire the lease at once so the
        # recovery task resumes it with a bounded number of attempts. If the child's record
        # of the start never reached the store, the message this process still holds says
        # what it was.
        unsaved = lifecycle.unsaved_start(sender, spec, task_id, _received.get(task_id))
        outcomes.finish_node(task_id, Status.CRASHED, ErrorInfo.from_exception(exception),
                              None, expire_lease=True, durable=True, unstarted=unsaved)
        return
    ctx = context.local.step
    if ctx is not None and ctx.node.id == task_id and ctx.node.status is Status.SUCCESS:
        # The step's SUCCESS is on record: what failed came after it (storing the result in
        # Celery's backend, publishing the next step). The record stands; recovery re-drives
        # a continuation that was never published.
        log.warning("livingai_tasks: %s (%s) succeeded and was recorded, then Celery failed "
                    "it (%s: %s); the record keeps its SUCCESS", getattr(sender, "name", ""),
                    task_id, type(exception).__name__, exception)
        return
    trace = getattr(einfo, "traceback", None)
    outcomes.finish_node(task_id, Status.FAILED, ErrorInfo.from_exception(exception, trace),
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
        outcomes.finish_node(task_id, Status.CRASHED, ErrorInfo("Cancelled", str(
            reason or "cancelled by Celery mid-step")), None, durable=True)
        return
    error = ErrorInfo.from_exception(reason) if isinstance(reason, BaseException) else \
        ErrorInfo("Retry", str(reason))
    when = getattr(reason, "when", None)  # Retry.when: a countdown in seconds, or an ETA
    due = (when.timestamp() if isinstance(when, datetime) else
           time.time() + float(when) if isinstance(when, (int, float)) else time.time())
    outcomes.finish_node(task_id, Status.RETRYING, error, None, extra={Meta.RETRY_DUE: due})


def _on_revoked(sender: Any = None, request: Any = None, terminated: bool = False,
                signum: Any = None, expired: bool = False, **_: Any) -> None:
    spec = spec_of(sender)
    task_id = getattr(request, "id", None) or getattr(request, "task_id", None)
    if spec is None or task_id is None:
        return
    why = "expired" if expired else ("terminated" if terminated else "revoked")
    if terminated and not spec.idempotent:
        # Killed while it ran: its side effect may have happened. Cancelled would hide that.
        outcomes.hold_terminated(task_id)
        return
    # The Context Celery passes carries the message headers.
    unstarted = outcomes.unstarted_node(task_id, spec, request, getattr(sender, "name", ""))
    outcomes.finish_node(task_id, Status.CANCELLED, ErrorInfo("Revoked", why),
                          ExecutionStatus.CANCELLED, unstarted=unstarted)


def _on_postrun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
    ctx = context.local.step
    context.local.step = None
    if ctx is not None and ctx.extra.get("heartbeat"):
        runtime.get().heartbeat.remove(ctx.execution_id)


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    """Before the worker reads any message: config may have changed since install(), so it
    is checked again (a raise would only be logged by Celery; SystemExit stops the worker);
    and the store must answer, or the worker would take steps it cannot record."""
    app = getattr(sender, "app", None)
    if app is None:
        return
    try:
        refuse_unsafe_serializers(app.conf, "found when the worker started")
        if runtime.is_configured():
            # Before the pool forks (its children write to the folder this prepares), and
            # before the store wait, so that a port in use fails the start at once.
            worker_metrics.start_worker(runtime.get().settings)
    except ConfigError as exc:
        log.critical("%s", exc)
        raise SystemExit(f"livingai_tasks: {exc}") from None
    if runtime.is_configured():
        runtime.get().wait_for_store()


_beat: list[WorkerBeat] = []  # this main process's liveness thread, once the worker is ready


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    """The worker's main process starts renewing its liveness record (see liveness.py)."""
    if runtime.is_configured() and not _beat:
        rt = runtime.get()
        beat = WorkerBeat(rt.settings, sender, rt.store_instance,
                          counters=worker_metrics.counters)
        if beat.start():
            _beat.append(beat)


# The steps' messages this main process holds (Celery's worker Requests, by task id), held
# weakly: Celery drops a request from its own registry before task_failure, but the request
# lives on while Celery handles it, and a child's death is read from it (_on_failure).
_received: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


def _on_received(request: Any = None, **_: Any) -> None:
    """The main process took a message: its liveness record should list it soon, and a
    step's request is kept (weakly) in case its pool child dies running it."""
    identity = StepIdentity.from_headers(getattr(request, "request_dict", None) or {})
    if identity is not None and isinstance(getattr(request, "id", None), str):
        _received[request.id] = request
    for beat in _beat:
        beat.poke(identity.execution_id if identity is not None else None)


def _on_process_init(**_: Any) -> None:
    runtime.after_fork()
    if runtime.is_configured():
        rt = runtime.get()
        rt.worker = owner_name(os.getppid())  # a pool child: its worker is its parent
        rt.engine  # noqa: B018 - build the engine (and its store) in this child
        worker_metrics.start_child()


def _on_process_shutdown(**_: Any) -> None:
    if runtime.is_configured():
        runtime.get().close(timeout_s=10.0)
    worker_metrics.stop_process()  # after close(): its last writes are counted too


def _on_worker_shutdown(**_: Any) -> None:
    if runtime.is_configured() and not runtime.get().flush(10.0):
        log.warning("livingai_tasks: some records were still queued at worker shutdown")
    while _beat:
        _beat.pop().stop()
    worker_metrics.stop_process()


_RECEIVERS = {
    signals.before_task_publish: _on_publish,
    signals.task_prerun: _on_prerun,
    signals.task_failure: _on_failure,
    signals.task_retry: _on_retry,
    signals.task_revoked: _on_revoked,
    signals.task_postrun: _on_postrun,
    signals.worker_init: _on_worker_init,
    signals.worker_ready: _on_worker_ready,
    signals.task_received: _on_received,
    signals.worker_process_init: _on_process_init,
    signals.worker_process_shutdown: _on_process_shutdown,
    signals.worker_shutdown: _on_worker_shutdown,
}
_connected: list[Any] = []  # strong references: Celery holds receivers weakly by default


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


def connect() -> None:
    """Connect every receiver once (dispatch_uid makes a second install() a no-op)."""
    for signal, handler in _RECEIVERS.items():
        receiver = _guarded(handler)
        _connected.append(receiver)
        signal.connect(receiver, weak=False, dispatch_uid=f"livingai_tasks.{handler.__name__}")
