"""Durable waits, the step's side: approval gates, `wait_for(name)` and `sleep(duration)`.

A step that must wait records itself WAITING (its node, with what it waits for under
Meta.WAIT, and its execution, whose lease_deadline becomes the wait's deadline or None)
durably, then ends its Celery task without running on: the message is acked (Ignore) and
the worker slot is free. Nothing stays in the broker: no countdown, no ETA, so a wait of
days survives every worker and broker restart. wake.py resumes it: an approve/deny, a
send, or the recovery tick for a due deadline claims the execution (a new fence) and
publishes the step's recorded message again, like `resolve`; the step's entry check then
finds its WAITING version under the new fence and runs it.

A woken step runs again from its start. So:
- an approval gate decides before the tool's body, which has then not run: approve runs
  the tool exactly as if it had never waited; deny fails it with ApprovalDenied;
- `wait_for` and `sleep` replay deterministically (mailbox.py): the k-th call of a run
  receives the same entry every time, so everything before a wait runs again on waking.
  Keep that part cheap and idempotent, or save progress with `checkpoint()` before the
  wait and read it back with `last_state()`, or wait as the step's first act. Enforced:
  a non-idempotent step (a tool_step, or idempotent=False) cannot wait inside its body,
  because its side effect would be repeated; gate it with approval=, or wait in an
  idempotent step before it.

Limits: one step at a time should wait for a given name in an execution (two group
members waiting for the same name may both receive its first event: receipt is recorded,
not compare-and-set); arrival order is the senders' clocks (created_at). `approvers` guards
against mistakes, not impostors: `by` is whatever the caller says, so authenticate callers
of approve/deny (and the CLI) where that matters.

Races: a send that lands between a step's look at its mailbox and its WAITING record is
seen by the step's second look, made after the record: it sets the execution's deadline to
now, and the recovery tick wakes it. A heartbeat that renews the lease after the record is
undone by the tick, which checks the recorded wait before it wakes anything.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

from .. import mailbox
from ..errors import FencedOutError, NotDurableError, WaitError, WaitTimeout
from ..nodes import ExecutionNode, ExecutionStatus, Meta, Status
from . import runtime
from .context import Decision, StepContext, local

__all__ = ["Suspended", "gate", "hold_start", "wait_for", "sleep", "record_waiting", "seconds"]

log = logging.getLogger("livingai_tasks.waits")


class Suspended(BaseException):  # noqa: N818 - not an error: the step's way out
    """Raised out of a step body once its WAITING record is durable. A BaseException, so
    that a step's own `except Exception` does not swallow it; StepTask turns it into
    Celery's Ignore (acked, no result, the chain stops here until the step is woken)."""


def seconds(value: Any, what: str) -> float | None:
    """A duration as seconds: a timedelta or a number >= 0, or None."""
    if value is None:
        return None
    if isinstance(value, timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise WaitError(f"{what} takes a timedelta or a number of seconds >= 0, got {value!r}.")
    return float(value)


def record_waiting(node: ExecutionNode, fence: int, wait: dict[str, Any],
                   reason: str) -> ExecutionNode:
    """Record the step WAITING (durably, under its fence), then look at its mailbox again:
    whatever arrived meanwhile makes the wait due now, for the recovery tick to wake."""
    engine = runtime.get().engine
    waiting = node.evolve(status=Status.WAITING, checkpoint=None,
                          metadata={**node.metadata, Meta.WAIT: wait})
    engine.save(waiting, durable=True)
    engine.update_execution(node.execution_id, durable=True, status=ExecutionStatus.WAITING,
                            current_node_id=node.id, lease_owner=None,
                            lease_deadline=wait.get("deadline"), reason=reason,
                            if_fence=fence)
    engine.metrics.incr("waits_started")
    if mailbox.readiness(wait, node.id, engine.store.nodes(node.execution_id), time.time()):
        engine.update_execution(node.execution_id, durable=True, lease_deadline=time.time(),
                                if_fence=fence)
    return waiting


# -- approval gates (called by the entry check, before the body) ---------------------------


def _needs_approval(approval: Any, node: ExecutionNode, args: list[Any],
                    kwargs: dict[str, Any]) -> bool:
    if approval is True:
        return True
    try:
        return bool(approval(*args, **kwargs))
    except Exception:  # noqa: BLE001 - a gate that cannot decide asks a person
        log.exception("livingai_tasks: the approval= callable of %s (%s) raised; the call "
                      "waits for a decision", node.metadata.get(Meta.TASK), node.id)
        return True


def gate(spec: Any, node: ExecutionNode, args: list[Any], kwargs: dict[str, Any],
         fence: int) -> StepContext | ExecutionNode:
    """The approval gate of a starting tool: the node to run (approved, or not gated for
    this call), or the context of a step that waits for a decision or was denied."""
    decided = node.metadata.get(Meta.APPROVAL)
    if isinstance(decided, dict) and decided.get("approved"):
        return node  # approved before (a retried or recovered attempt): not asked again
    engine = runtime.get().engine
    got = mailbox.entries(engine.store.nodes(node.execution_id), mailbox.APPROVAL, node.id)
    if got:
        entry = got[0]
        info = ({"approved": False, "by": "timeout", "reason": "no decision before its "
                 "deadline"} if mailbox.is_timeout(entry) else dict(entry.output or {}))
        node = node.evolve(metadata={**node.metadata, Meta.APPROVAL: info})
        if info.get("approved"):
            return node
        reason = (f"tool {node.metadata.get(Meta.TASK)} ({node.id}) was denied by "
                  f"{info.get('by')}: {info.get('reason') or 'no reason given'}")
        return StepContext(node, Decision.DENIED, fence, reason)
    if not _needs_approval(spec.approval, node, args, kwargs):
        return node
    prev = node.metadata.get(Meta.WAIT) or {}
    deadline = prev.get("deadline") if prev.get("kind") == "approval" else (
        time.time() + spec.approval_timeout_s if spec.approval_timeout_s is not None else None)
    wait = mailbox.wait_info("approval", mailbox.APPROVAL, 0, deadline,
                             tool=node.metadata.get(Meta.TASK),
                             approvers=list(spec.approvers))
    reason = f"waiting for approval of {node.metadata.get(Meta.TASK)} ({node.id})"
    try:
        waiting = record_waiting(node, fence, wait, reason)
    except FencedOutError as exc:
        return StepContext(node, Decision.STALE, fence, str(exc))
    except NotDurableError as exc:
        _not_durable(node, exc)
        waiting = node
    log.info("livingai_tasks: %s", reason)
    return StepContext(waiting, Decision.WAIT, fence, reason)


def _not_durable(node: ExecutionNode, exc: NotDurableError) -> None:
    # The WAITING record stays queued and lands when the store is back. If this process
    # dies first, the execution's lease runs out and recovery publishes the step again,
    # which only looks at its wait again (the tool's body has not run).
    log.warning("livingai_tasks: the WAITING record of %s (%s) is not durable yet (%s); it "
                "stays queued, and recovery resumes the wait if it is lost",
                node.metadata.get(Meta.TASK), node.id, exc)


def hold_start(delay_s: float, node: ExecutionNode, fence: int) -> StepContext | None:
    """start_after=: None once the step's start time has come (it runs), else the context of
    a step WAITING until then. The start time is recorded the first time the step is reached,
    so a redelivered or recovered copy keeps it; the body has not run, so even a tool may
    wait here."""
    prev = node.metadata.get(Meta.WAIT) or {}
    if prev.get("name") == mailbox.START_AFTER and float(prev.get("deadline") or 0) <= time.time():
        return None  # woken at its start time
    engine = runtime.get().engine
    got = mailbox.entries(engine.store.nodes(node.execution_id), mailbox.START_AFTER, node.id)
    try:
        if got:
            due = float((got[0].output or {}).get("due", 0.0))
        else:
            due = time.time() + delay_s
            engine.save(mailbox.make_entry(node.execution_id, mailbox.START_AFTER, {"due": due},
                                           f"start:{node.id}", fence=fence,
                                           consumed_by=node.id), durable=True)
        if due <= time.time():
            return None
        reason = (f"{node.metadata.get(Meta.TASK)} ({node.id}) starts after "
                  f"{time.strftime('%F %T', time.gmtime(due))} UTC")
        waiting = record_waiting(node, fence, mailbox.wait_info(
            "sleep", mailbox.START_AFTER, 0, due), reason)
    except FencedOutError as exc:
        return StepContext(node, Decision.STALE, fence, str(exc))
    return StepContext(waiting, Decision.WAIT, fence, reason)


# -- waits inside a step body ---------------------------------------------------------------


def _current(what: str) -> StepContext:
    ctx = local.step
    if ctx is None:
        raise WaitError(f"livingai_tasks.{what}() works only inside a running @agent_step "
                        "(and after livingai_tasks.install(app)).")
    if not ctx.node.is_idempotent():
        raise WaitError(
            f"livingai_tasks.{what}() in {ctx.node.metadata.get(Meta.TASK)}: a non-idempotent "
            "step cannot wait inside its body, because a woken step runs again from its "
            "start and would repeat its side effect. Gate a tool with "
            "@tool_step(approval=...), or wait in an idempotent step before it.")
    return ctx


def _next_index(ctx: StepContext, name: str) -> int:
    counters: dict[str, int] = ctx.extra.setdefault("waits", {})
    index = counters.get(name, 0)
    counters[name] = index + 1
    return index


def _suspend(ctx: StepContext, wait: dict[str, Any], reason: str) -> None:
    rt = runtime.get()
    if ctx.extra.pop("heartbeat", False):
        rt.heartbeat.remove(ctx.execution_id)  # a waiting step holds no lease
    try:
        ctx.node = record_waiting(ctx.node, ctx.fence, wait, reason)
    except FencedOutError as exc:
        raise Suspended(f"this attempt lost its execution while suspending: {exc}") from None
    except NotDurableError as exc:
        _not_durable(ctx.node, exc)  # an idempotent step: at worst it runs and waits again
    log.info("livingai_tasks: %s", reason)
    raise Suspended(reason)


def _receive(ctx: StepContext, entry: ExecutionNode) -> ExecutionNode:
    if entry.metadata.get(Meta.CONSUMED_BY) != ctx.node.id:
        runtime.get().engine.save(entry.evolve(metadata={
            **entry.metadata, Meta.CONSUMED_BY: ctx.node.id, Meta.FENCE: ctx.fence}),
            durable=True)
    return entry


def wait_for(name: str, timeout: timedelta | float | None = None) -> Any:
    """The payload of the next event `name` sent to this execution (lai.send / `livingai-tasks
    send`): at once if it is in the mailbox, else the step suspends, frees its worker, and
    runs again from its start once the event comes. After `timeout` without it, the re-run
    step gets WaitTimeout here. Only in idempotent steps (see the module docstring)."""
    ctx = _current("wait_for")
    name = mailbox.user_name(name)
    timeout_s = seconds(timeout, "wait_for(timeout=...)")
    index = _next_index(ctx, name)
    engine = runtime.get().engine
    got = mailbox.entries(engine.store.nodes(ctx.execution_id), name, ctx.node.id)
    if len(got) > index:
        entry = _receive(ctx, got[index])
        if mailbox.is_timeout(entry):
            raise WaitTimeout(f"no event {name!r} came for execution {ctx.execution_id} "
                              f"within its timeout")
        return entry.output
    prev = ctx.node.metadata.get(Meta.WAIT) or {}
    same = prev.get("kind") == "event" and prev.get("name") == name and \
        prev.get("index") == index
    deadline = prev.get("deadline") if same else (
        time.time() + timeout_s if timeout_s is not None else None)
    if deadline is not None and float(deadline) <= time.time():
        marker = mailbox.timeout_marker(ctx.execution_id, name, ctx.node.id, index,
                                        float(deadline), fence=ctx.fence)
        engine.save(marker, durable=True)
        raise WaitTimeout(f"no event {name!r} came for execution {ctx.execution_id} within "
                          "its timeout")
    _suspend(ctx, mailbox.wait_info("event", name, index, deadline),
             f"waiting for event {name!r}")


def sleep(duration: timedelta | float) -> None:
    """Sleep without holding a worker: the step suspends and the recovery tick wakes it once
    `duration` has passed (never a broker countdown). Its due time is recorded the first
    time it is reached, so a re-run of the step does not sleep again."""
    ctx = _current("sleep")
    seconds_ = seconds(duration, "sleep()")
    if seconds_ is None:
        raise WaitError("sleep() takes a timedelta or a number of seconds, got None.")
    index = _next_index(ctx, mailbox.SLEEP)
    engine = runtime.get().engine
    got = mailbox.entries(engine.store.nodes(ctx.execution_id), mailbox.SLEEP, ctx.node.id)
    if len(got) > index:
        due = float((got[index].output or {}).get("due", 0.0))
    else:
        due = time.time() + seconds_
        engine.save(mailbox.make_entry(ctx.execution_id, mailbox.SLEEP, {"due": due},
                                       f"sleep:{ctx.node.id}:{index}", fence=ctx.fence,
                                       consumed_by=ctx.node.id), durable=True)
    if due <= time.time():
        return
    _suspend(ctx, mailbox.wait_info("sleep", mailbox.SLEEP, index, due),
             f"sleeping until {time.strftime('%F %T', time.gmtime(due))} UTC")
