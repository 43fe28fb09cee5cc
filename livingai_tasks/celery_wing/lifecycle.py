"""A step's start on record: the entry decision and the RUNNING version (its outcome is
recorded by outcomes.py).

`decide()` is the entry decision as a pure function of what the store holds (tested as a
table, like recovery planning); begin_step() reads the store, decides, and writes the
RUNNING version with its lease through the checkpoint engine.

Reads go to the store itself, past the engine's hot cache, wherever the answer may have
been written by another process: the entry check (an operator's resolution, recovery's
fence), a RUNNING version's lease, and a group's siblings. Everything else reads through
the engine, which answers from this process's own newest versions first.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.app.task import Context as TaskRequest

from ..engine.store_health import note_failure
from ..errors import (
    FencedOutError,
    NotDurableError,
    StoreError,
    StoreUnavailableError,
)
from ..nodes import (
    Execution,
    ExecutionNode,
    ExecutionStatus,
    Meta,
    NodeType,
    Status,
    utcnow,
)
from ..stores import IF_FENCE
from . import context, runtime, waits
from .context import Decision, StepContext
from .liveness import owner_name
from .messages import StepIdentity

__all__ = ["StepSpec", "Reconciled", "decide", "begin_step", "refused_start",
           "saved_request", "unsaved_start"]

log = logging.getLogger("livingai_tasks.lifecycle")

# What recovery needs to publish a step again with the same identity and continuation.
_REQUEST_FIELDS = ("chain", "callbacks", "errbacks", "chord", "group", "group_index",
                   "root_id", "parent_id", "retries", "hostname", "reply_to", "correlation_id")
# Who recovered or resolved a step stays on record in its next attempt; the resolution
# itself does not carry over (a retried tool that crashes again is of unknown outcome again).
# An approval (and the wait a step was woken from) carry over too: an approved tool is not
# asked again when it is retried, and a wait keeps its deadline when the step re-runs.
_CARRIED = (Meta.RECOVERED_BY, Meta.RECOVERED_AT, Meta.RESOLVED_BY, Meta.RESOLVED_AT,
            Meta.APPROVAL, Meta.WAIT, Meta.WOKEN_BY)


@dataclass(frozen=True)
class Reconciled:
    """What a reconcile callback answers: did the side effect happen, and with what output?"""

    done: bool
    output: Any = None


@dataclass(frozen=True)
class StepSpec:
    """How the lifecycle treats a step: its node type, whether it is safe to run again,
    how to ask the outside world whether a tool's effect happened, and its approval gate
    (None: none; True: every call; a callable(*args, **kwargs) -> bool: the calls it says)
    with who may approve and how long a decision may take (seconds; None: no deadline)."""

    type: NodeType
    idempotent: bool
    reconcile: Callable[..., Reconciled] | None = None
    approval: bool | Callable[..., bool] | None = None
    approvers: tuple[str, ...] = ()
    approval_timeout_s: float | None = None
    start_after_s: float | None = None  # a durable delay before the body first runs


# -- the entry decision ------------------------------------------------------------------


def decide(existing: ExecutionNode | None, identity: StepIdentity, *, owner: str,
           reconcilable: bool, lease_deadline: float | None = None,
           now: float = 0.0) -> tuple[Decision, str]:
    """What a starting step does, given the store's latest version of it (`existing`),
    the identity its message carries, and this process's `owner` name. `lease_deadline` is
    the execution's lease, needed only when `existing` is RUNNING under another owner."""
    if existing is None:
        return Decision.RUN, ""
    fence = identity.fence
    recorded_fence = int(existing.metadata.get(Meta.FENCE, 0))
    if existing.execution_id != identity.execution_id or existing.seq != identity.seq \
            or fence > recorded_fence:
        # Nothing legitimate does this: recovery and resolve record the new fence before
        # they publish, and a step's id belongs to one place in one execution.
        return Decision.REFUSED, (
            f"task id {existing.id} is step #{existing.seq} of execution "
            f"{existing.execution_id} under fence {recorded_fence}, but this message says "
            f"step #{identity.seq} of execution {identity.execution_id} under fence {fence} "
            "(a task_id reused for another execution, or a forged header): refused, nothing "
            "run or recorded")
    if fence < recorded_fence:
        return Decision.STALE, (
            f"step #{existing.seq} ({existing.id}) of execution {existing.execution_id}: an "
            f"older copy (fence {fence}) of a step recovery resumed under fence "
            f"{recorded_fence}: it neither runs nor records anything here")
    status = existing.status
    if status is Status.WAITING:
        # Woken (approve, send, a due timer) under this fence, or a redelivered copy of the
        # attempt that suspended: either way the step looks at its wait again from its start.
        return Decision.RUN, "woken from a wait"
    if status in (Status.SUCCESS, Status.SKIPPED):
        return Decision.REPLAY, "already done: its recorded output is returned"
    if status is Status.IN_DOUBT:
        if existing.metadata.get(Meta.RESOLUTION) == "retry":
            return Decision.RUN, "an operator chose to run it again"
        return Decision.IN_DOUBT, str(existing.metadata.get(Meta.IN_DOUBT_REASON, "held"))
    if status is Status.RUNNING and existing.metadata.get(Meta.OWNER) != owner \
            and lease_deadline is not None and lease_deadline > now:
        return Decision.STALE, "a duplicate delivery while the step runs elsewhere"
    if status in (Status.RUNNING, Status.CRASHED) and not existing.is_idempotent():
        why = (f"tool step {existing.metadata.get(Meta.TASK)} ({existing.id}) started in "
               f"attempt {existing.metadata.get(Meta.ATTEMPT)} and its worker died before it "
               "finished: the side effect may or may not have happened")
        if reconcilable:
            return Decision.RECONCILE, why
        return Decision.IN_DOUBT, why
    return Decision.RUN, ""


def _needs_lease(existing: ExecutionNode | None, owner: str) -> bool:
    return (existing is not None and existing.status is Status.RUNNING
            and existing.metadata.get(Meta.OWNER) != owner)


# -- a step starts ------------------------------------------------------------------------


def _identity(task: Any, task_id: str) -> tuple[StepIdentity, bool]:
    """The starting step's identity, and whether it starts an execution of its own."""
    found = StepIdentity.from_request(task.request)
    if found is not None:
        return found, False
    pub = context.local.publish
    if pub is not None:  # eager mode inside start(): steps run one after another, here
        context.local.publish = pub.next_step(task_id)
        return pub, False
    # A step sent without start(): the canvas root names the execution, so every step of
    # the same canvas (and every redelivery) lands in the same one.
    return StepIdentity(task.request.root_id or task_id), True


def begin_step(task: Any, spec: StepSpec, task_id: str, args: list[Any],
               kwargs: dict[str, Any]) -> StepContext:
    """Decide whether the step runs and record its RUNNING version (with its lease)."""
    rt = runtime.get()
    engine = rt.engine
    identity, new_execution = _identity(task, task_id)
    if new_execution:
        engine.create_execution(Execution(id=identity.execution_id,
                                          metadata={Meta.ROOT_TASK: task.name}))
    try:
        if spec.approval is None and not spec.start_after_s \
                and engine.can_append_if_new(task_id):
            # The usual case, a first delivery: the entry check and the RUNNING record with
            # its lease in one round trip. Anything else goes the long way, with what was found.
            first = _running_node(rt, task, spec, task_id, identity, args, kwargs, None)
            lease_changes = _lease(rt, task_id, identity.fence)
            existing = _patiently(rt, lambda: _first_record(engine, first, lease_changes))
            if existing == first:
                return _started(rt, StepContext(first, Decision.RUN, identity.fence, ""))
        else:
            existing = _patiently(rt, lambda: _entry_read(engine, task_id))
    except FencedOutError as exc:
        # Its execution was claimed since this message was sent: a newer copy of the step
        # runs (or ran) elsewhere.
        return StepContext(ExecutionNode(id=task_id, execution_id="", type=spec.type),
                           Decision.STALE, identity.fence, _fenced_out(task.name, exc))
    except StoreUnavailableError as exc:
        engine.metrics.incr("steps_requeued_store_down")
        return StepContext(ExecutionNode(id=task_id, execution_id="", type=spec.type),
                           Decision.STORE_DOWN, identity.fence,
                           f"step {task.name} ({task_id}) did not start: its store is "
                           f"unreachable ({exc}) after {rt.settings.store_wait_s:g} s; its "
                           "message goes back to the broker to run later")
    lease = _lease_deadline(engine, existing) if _needs_lease(existing, rt.owner) else None
    decision, reason = decide(existing, identity, owner=rt.owner,
                              reconcilable=spec.reconcile is not None, lease_deadline=lease,
                              now=time.time())
    if existing is not None and decision in (Decision.REPLAY, Decision.STALE, Decision.REFUSED):
        if decision is Decision.REFUSED:
            log.error("livingai_tasks: %s", reason)
            engine.metrics.incr("steps_refused")
        elif decision is Decision.STALE:
            log.warning("livingai_tasks: %s", reason)  # a worker woken after losing its step
        return StepContext(existing, decision, identity.fence, reason)
    if existing is not None and decision is Decision.IN_DOUBT:
        held = existing.evolve(status=Status.IN_DOUBT,
                               metadata={**existing.metadata, Meta.IN_DOUBT_REASON: reason})
        engine.save(held, durable=True)
        engine.update_execution(identity.execution_id, durable=True,
                                status=ExecutionStatus.IN_DOUBT, reason=reason,
                                current_node_id=task_id, lease_deadline=None,
                                if_fence=identity.fence)
        return StepContext(held, decision, identity.fence, reason)

    node = _running_node(rt, task, spec, task_id, identity, args, kwargs, existing)
    if spec.start_after_s and decision is Decision.RUN:
        delayed = waits.hold_start(spec.start_after_s, node, identity.fence)
        if delayed is not None:
            return delayed  # WAITING until its start time: the body has not run
    if spec.approval is not None and decision is Decision.RUN:
        gated = waits.gate(spec, node, args, kwargs, identity.fence)
        if isinstance(gated, StepContext):
            return gated  # WAITING for a decision, or denied: the body does not run
        node = gated
    ctx = StepContext(node, decision, identity.fence, reason)
    # A step that takes over a record (woken from a wait, run again after a crash or by an
    # operator) may start after its execution's lease ran out, its message queued behind a
    # backlog: recovery may claim the execution at any moment. Its lease is then taken
    # durably before the body runs, a compare-and-set on the fence: either this attempt
    # holds a live lease (a claim needs an expired one) or the claim came first and this
    # copy is stale. Otherwise both would run the body (a woken wait delivered twice).
    takes_over = existing is not None
    try:
        # A non-idempotent tool leaves durable evidence before it runs, so a crash during
        # it can never be mistaken for "never started".
        # Bookkeeping of an idempotent step does not wait for the store: if this process
        # dies before it lands, the lease expiry (or the stuck-step check) covers it.
        # A tool's start never queues behind data writes (the priority lane).
        engine.save(node, durable=not node.is_idempotent(), wait=False,
                    priority=not node.is_idempotent() or takes_over)
        # Queued right behind the RUNNING version: the two land in one store write.
        engine.update_execution(identity.execution_id, durable=takes_over, wait=False,
                                priority=takes_over, **_lease(rt, task_id, identity.fence))
    except FencedOutError as exc:
        # A tool's start (and a take-over's lease) is a compare-and-set on the fence: a
        # worker that lost the step before this point (paused past its lease, say) never
        # runs its body.
        ctx.decision, ctx.reason = Decision.STALE, _fenced_out(task.name, exc, task_id)
        return ctx
    except NotDurableError as exc:
        if exc.still_queued:
            return _start_not_durable(rt, ctx, task.name, exc)
        ctx.decision = Decision.NO_INTENT
        ctx.reason = (f"step {task.name} ({task_id}) did not run: its intent record could not "
                      f"be made durable ({exc}); it is safe to retry")
        return ctx
    return _started(rt, ctx)


def _start_not_durable(rt: Any, ctx: StepContext, task_name: str,
                       exc: NotDurableError) -> StepContext:
    """A tool (or a step taking over a record) whose start the store did not take in time
    (it went down after the entry check): the body has not run, and its message goes back
    to the broker, as a step that finds its store down at entry does, instead of failing
    the execution. Its RUNNING version stays queued and lands once the store answers; a
    PENDING version queued behind it (same node: written after it) says the start was
    withdrawn, so the next delivery runs the tool instead of holding a start of unknown
    outcome IN_DOUBT."""
    node = ctx.node
    withdrawn = node.evolve(status=Status.PENDING,
                            metadata={**node.metadata, Meta.NOT_STARTED: str(exc)})
    rt.engine.save(withdrawn, wait=False, priority=True)
    rt.engine.metrics.incr("steps_requeued_store_down")
    ctx.decision = Decision.STORE_DOWN
    ctx.reason = (f"step {task_name} ({node.id}) did not run: its start could not be made "
                  f"durable ({exc}); its message goes back to the broker to run later")
    return ctx


def _fenced_out(task_name: str, exc: FencedOutError, node_id: str = "") -> str:
    current = exc.current_fence if exc.current_fence >= 0 else "newer"
    reason = (f"step {task_name} ({exc.node_id or node_id}) lost its execution "
              f"{exc.execution_id} to a newer attempt (its fence {exc.record_fence}, the "
              f"execution's {current}): it neither runs nor records anything here")
    log.warning("livingai_tasks: %s", reason)
    return reason


def refused_start(task: Any, spec: StepSpec, task_id: str, exc: Exception) -> StepContext | None:
    """The context of a step whose start could not be recorded: an idempotent step runs
    unrecorded (None: the lease expiry still covers a crash); a tool must not run without
    evidence that it started."""
    if spec.idempotent:
        return None
    placeholder = ExecutionNode(id=task_id, execution_id="", type=spec.type)
    return StepContext(placeholder, Decision.NO_INTENT, 0,
                       f"tool step {task.name} ({task_id}) did not run: the store could not "
                       f"record its start ({exc})")


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


def _running_node(rt: runtime.Runtime, task: Any, spec: StepSpec, task_id: str,
                  identity: StepIdentity, args: list[Any], kwargs: dict[str, Any],
                  existing: ExecutionNode | None, *, request: Any = None,
                  owner: str | None = None) -> ExecutionNode:
    """The RUNNING version of a starting step: what recovery needs to publish it again.
    `request` and `owner` default to the running task's request and this process's name."""
    attempt = int(existing.metadata.get(Meta.ATTEMPT, 0)) + 1 if existing else 1
    if existing is not None and existing.status is Status.WAITING:
        attempt -= 1  # a wait is not a crash: woken steps must not count towards max_attempts
    carried = {k: v for k, v in (existing.metadata if existing else {}).items() if k in _CARRIED}
    return ExecutionNode(
        id=task_id, execution_id=identity.execution_id, parent_id=identity.parent_id,
        seq=identity.seq, type=spec.type, status=Status.RUNNING,
        created_at=existing.created_at if existing else utcnow(),
        input={"args": args, "kwargs": kwargs},
        metadata={Meta.TASK: task.name, Meta.IDEMPOTENT: spec.idempotent, Meta.ATTEMPT: attempt,
                  Meta.RECONCILABLE: spec.reconcile is not None,
                  Meta.FENCE: identity.fence, Meta.OWNER: owner or rt.owner,
                  Meta.WORKER: rt.worker,
                  Meta.REQUEST: saved_request(task.request if request is None else request,
                                              task.name), **carried},
    )


def unsaved_start(task: Any, spec: StepSpec, task_id: str,
                  request: Any) -> ExecutionNode | None:
    """In a worker's main process, after its pool child died mid-step: the RUNNING version
    the child built and may not have stored yet (an idempotent step's start waits in the
    child's memory while the writer gathers, writer.GATHER_S), built again from the message
    the main process holds (Celery's worker Request: its headers, and the args, kwargs and
    canvas of its body). Marked CRASHED, it lets recovery re-run the step at once; without
    it recovery would find the previous step done and wait `stuck_after_s` for this one.
    None for a tool (its start is stored before its body runs: no record means the body
    never ran) and for a message that is not a step's, cannot be read, or is gone (None)."""
    payload = getattr(request, "_payload", None)  # (args, kwargs, embed): Celery 5.5-5.7
    fields = getattr(request, "request_dict", None)
    if not spec.idempotent or not isinstance(fields, dict) or \
            not isinstance(payload, (tuple, list)) or len(payload) != 3:
        return None
    args, kwargs, embed = payload
    message = TaskRequest({**fields, **(embed or {})})  # what the child's task.request held
    identity = StepIdentity.from_request(message)
    if identity is None:
        return None
    pid = getattr(request, "worker_pid", None)
    return _running_node(runtime.get(), task, spec, task_id, identity, list(args or ()),
                         dict(kwargs or {}), None, request=message,
                         owner=owner_name(pid) if isinstance(pid, int) else None)


def _lease(rt: runtime.Runtime, task_id: str, fence: int) -> dict[str, Any]:
    """The lease a starting step takes: applied only while its fence is the execution's."""
    return {"current_node_id": task_id, "lease_owner": rt.owner,
            "lease_deadline": time.time() + rt.settings.lease_s, IF_FENCE: fence}


def _started(rt: runtime.Runtime, ctx: StepContext) -> StepContext:
    rt.heartbeat.add(ctx.node.execution_id, ctx.fence)
    ctx.extra["heartbeat"] = True
    return ctx


def _first_record(engine: Any, node: ExecutionNode,
                  lease: dict[str, Any]) -> ExecutionNode | None:
    """Write `node` as the step's first record unless the store has one: returns `node` if
    it is now stored, else the store's latest version."""
    try:
        existing: ExecutionNode | None = engine.append_if_new(node, **lease)
    except StoreError:
        # Landed or not (the reply may be what was lost): the record says which.
        return engine.store.get_node(node.id)  # type: ignore[no-any-return]
    return node if existing is None else existing


def _patiently(rt: runtime.Runtime, read: Callable[[], ExecutionNode | None]
               ) -> ExecutionNode | None:
    """The entry check, waiting up to `store_wait_s` for an unreachable store: a step does
    not start on a guess. StoreUnavailableError once the wait is over."""
    deadline = time.monotonic() + rt.settings.store_wait_s
    pause = 0.1
    while True:
        try:
            return read()
        except StoreUnavailableError:
            note_failure()
            if time.monotonic() + pause > deadline:
                raise
            time.sleep(pause)
            pause = min(pause * 2, 1.0)


# -- reads of the store itself (see the module docstring) ----------------------------------


def _entry_read(engine: Any, node_id: str) -> ExecutionNode | None:
    """The store's latest version of the node, unless this process still holds a newer one
    of its own that the store has not taken (an earlier attempt's records queued through an
    outage, such as a tool start it withdrew): on the store's alone, a withdrawn start would
    look like a crash and be held IN_DOUBT. Deciding on this process's own is safe even if
    another worker took the step over since: the start that follows is a compare-and-set on
    the fence, which refuses an outdated attempt."""
    own: ExecutionNode | None = engine.queued_version(node_id)
    return own if own is not None else engine.store.get_node(node_id)


def _lease_deadline(engine: Any, node: ExecutionNode | None) -> float | None:
    execution = engine.store.get_execution(node.execution_id) if node is not None else None
    return execution.lease_deadline if execution is not None else None
