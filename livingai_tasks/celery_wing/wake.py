"""Durable waits, the outside's side: send an event, approve or deny a gated tool, wake due
waits (the recovery tick), cancel a waiting execution.

Waking is resolve's mechanism (recover.py): claim the execution (compare-and-set on its
fence, so of a send, an approval and a tick racing to wake one step exactly one wins), give
the step's WAITING version the new fence, set the execution RUNNING with a fresh lease, and
publish the recorded step message again. A waker that dies after its claim leaves a RUNNING
execution whose lease runs out: recovery then re-publishes its WAITING step (recovery.py),
which only looks at its wait again. A claim normally counts as a recovery; a wake puts the
count back, so a step may wait any number of times under max_recoveries.

Due waits are found through the execution's lease index: a WAITING execution's
lease_deadline is its wait's deadline (None: it has none), so the tick asks for WAITING
executions whose deadline has passed, one indexed range read however many wait.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from celery import Celery

from .. import mailbox
from ..errors import FencedOutError, WaitError
from ..nodes import Execution, ExecutionNode, ExecutionStatus, Meta, Status, dumps_json, utcnow
from ..settings import Settings
from ..stores import AppendsIfNew, Store
from . import runtime
from .recover import republish

__all__ = ["send_event", "decide_approval", "wake", "wake_due", "cancel_waiting", "send",
           "approve", "deny", "cancel", "WakeReport"]

log = logging.getLogger("livingai_tasks.wake")


def _claim_lease(settings: Settings) -> float:
    # Long enough for the published step to start and take the lease over.
    return max(settings.lease_s, settings.stuck_after_s)


def wake(app: Celery, store: Store, settings: Settings, execution: Execution,
         node: ExecutionNode, *, by: str, why: str) -> bool:
    """Resume a WAITING step: claim, fence, RUNNING, publish. False if another waker (or a
    cancel) changed the execution first."""
    now = time.time()
    # A wait's deadline sits in the lease field: claim as of a moment past it.
    claim_at = max(now, (execution.lease_deadline or 0.0) + 1e-3)
    if not store.claim(execution.id, fence=execution.fence, owner=by,
                       lease_s=_claim_lease(settings), now=claim_at):
        return False
    fence = execution.fence + 1
    woken = node.evolve(checkpoint=None, metadata={
        **node.metadata, Meta.FENCE: fence,
        Meta.WOKEN_BY: {"by": by, "why": why, "at": utcnow().isoformat()}})
    store.append([woken])
    store.update_execution(execution.id, status=ExecutionStatus.RUNNING, reason=why,
                           attempts=execution.attempts, current_node_id=node.id,
                           lease_deadline=now + _claim_lease(settings))
    republish(app, woken, fence)
    _count("waits_woken")
    log.info("livingai_tasks: woke %s (%s) of %s: %s", node.metadata.get(Meta.TASK), node.id,
             execution.id, why)
    return True


def _count(name: str, by: int = 1) -> None:
    if runtime.is_configured():
        runtime.get().engine.metrics.incr(name, by)


def _waiting_step(store: Store, execution_id: str,
                  ) -> tuple[Execution | None, ExecutionNode | None]:
    execution = store.get_execution(execution_id)
    if execution is None or execution.status is not ExecutionStatus.WAITING \
            or not execution.current_node_id:
        return execution, None
    node = store.get_node(execution.current_node_id)
    if node is None or node.status is not Status.WAITING:
        return execution, None
    return execution, node


def _wake_if_ready(app: Celery, store: Store, settings: Settings, execution_id: str,
                   by: str) -> bool:
    execution, node = _waiting_step(store, execution_id)
    if execution is None or node is None:
        return False
    wait = node.metadata.get(Meta.WAIT) or {}
    if mailbox.readiness(wait, node.id, store.nodes(execution_id), time.time()) != "ready":
        return False
    return wake(app, store, settings, execution, node, by=by,
                why=f"{wait.get('name')} arrived")


def _store_entry(store: Store, entry: ExecutionNode) -> str:
    """Append the entry unless its id is stored: "stored", "exists", or "fenced" (refused:
    the execution's fence moved past the one the entry was made under)."""
    if isinstance(store, AppendsIfNew):
        try:
            return "stored" if store.append_if_new(entry, {}) is None else "exists"
        except FencedOutError:
            return "fenced"
    if store.get_node(entry.id) is not None:
        return "exists"
    return "fenced" if store.append([entry]) else "stored"


def _put_entry(store: Store, execution_id: str, make: Callable[[int], ExecutionNode],
               what: str) -> tuple[str, ExecutionNode]:
    """Store the entry `make(fence)` under the execution's current fence, reading the fence
    again if a claim moves it meanwhile."""
    for _ in range(5):
        execution = store.get_execution(execution_id)
        if execution is None:
            raise WaitError(f"No execution {execution_id!r}: {what} goes to an existing "
                            "execution (the id lai.start() returned).")
        entry = make(execution.fence)
        if execution.status in (ExecutionStatus.COMPLETED, ExecutionStatus.FAILED,
                                ExecutionStatus.CANCELLED):
            if store.get_node(entry.id) is not None:
                return "exists", entry  # a retry of a send that was delivered: not an error
            raise WaitError(f"Execution {execution_id} is {execution.status.value}: nothing "
                            f"will receive {what}.")
        outcome = _store_entry(store, entry)
        if outcome != "fenced":
            return outcome, entry
    raise WaitError(f"Could not store {what} for {execution_id}: the execution kept "
                    "changing; send again (with the same key it is not stored twice).")


def send_event(app: Celery, store: Store, settings: Settings, execution_id: str, name: str,
               payload: Any = None, *, key: str | None = None, by: str = "sender",
               _reserved: bool = False) -> bool:
    """Put an event in the execution's mailbox, once per (name, key), and wake the step
    waiting for it. Returns True if this call stored it, False for a duplicate (a retry
    with the same key): a retry still wakes the step, so a sender that died between the
    two finishes the job by sending again. Without a key every call is a new event."""
    if not _reserved:
        name = mailbox.user_name(name)
    dumps_json(payload, what=f"event {name!r}")
    if key is not None and (not isinstance(key, str) or not key):
        raise WaitError(f"send(key=...) takes a non-empty string, got {key!r}.")
    key = key if key is not None else f"auto:{time.time_ns()}:{id(payload)}"
    outcome, _ = _put_entry(store, execution_id, lambda fence: mailbox.make_entry(
        execution_id, name, payload, key, fence=fence), f"event {name!r}")
    stored = outcome == "stored"
    if stored:
        _count("events_sent")
    _wake_if_ready(app, store, settings, execution_id, by)
    return stored


def decide_approval(app: Celery, store: Store, settings: Settings, execution_id: str,
                    node_id: str, *, approved: bool, by: str, comment: str | None = None,
                    reason: str | None = None) -> ExecutionNode:
    """Record a decision on a gated tool (who, when, comment or reason), then publish it
    again: approved, it runs; denied, it fails with ApprovalDenied."""
    if not isinstance(by, str) or not by:
        raise WaitError(f"A decision names who made it (by=...), got {by!r}.")
    execution, node = _waiting_step(store, execution_id)
    if node is None or node.id != node_id:
        node = store.get_node(node_id)
        what = node.status.value if node is not None else "not found"
        raise WaitError(f"Node {node_id} of execution {execution_id} is not waiting for an "
                        f"approval ({what}; execution "
                        f"{execution.status.value if execution else 'not found'}).")
    wait = node.metadata.get(Meta.WAIT) or {}
    if wait.get("kind") != "approval":
        raise WaitError(f"Node {node_id} waits for {wait.get('kind')} {wait.get('name')!r}, "
                        "not for an approval: use send for an event.")
    approvers = wait.get("approvers") or []
    if approvers and by not in approvers:
        raise WaitError(f"{by!r} may not decide on {node.metadata.get(Meta.TASK)}: its "
                        f"approvers are {', '.join(approvers)}.")
    decision = {"approved": approved, "by": by, "at": utcnow().isoformat(),
                **({"comment": comment} if comment else {}),
                **({"reason": reason} if reason else {})}
    outcome, entry = _put_entry(store, execution_id, lambda fence: mailbox.make_entry(
        execution_id, mailbox.APPROVAL, decision, node_id, fence=fence, consumed_by=node_id),
        f"the decision on {node_id}")
    if outcome == "exists":
        stored = store.get_node(entry.id)
        if stored is not None and (stored.output or {}).get("approved") != approved:
            raise WaitError(f"Node {node_id} was already decided: {stored.output}.")
    _count("events_sent")
    if not _wake_if_ready(app, store, settings, execution_id, by):
        raise WaitError(f"The decision on {node_id} is recorded, but execution {execution_id} "
                        "changed meanwhile (woken or cancelled by another call); if the step still "
                        "waits, the same call again resumes it.")
    return entry


@dataclass
class WakeReport:
    woken: list[str] = field(default_factory=list)
    timed_out: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)


def wake_due(app: Celery, store: Store, settings: Settings, *, by: str,
             now: float | None = None) -> WakeReport:
    """The recovery tick's part: WAITING executions whose deadline passed (an index range
    read, `recovery_page` at a time). Each is woken: its sleep is due, its event or decision
    came, or its timeout passed (a timeout marker is stored first, so the re-run step raises
    WaitTimeout, or its gated tool is denied). A deadline that is not the wait's own (a late
    lease renewal) is put back."""
    now = time.time() if now is None else now
    report = WakeReport()
    for execution in store.list_executions(status=ExecutionStatus.WAITING,
                                           lease_expired_before=now,
                                           limit=settings.recovery_page):
        try:
            _wake_one(app, store, settings, execution, by, now, report)
        except Exception:  # noqa: BLE001 - one bad execution must not stop the page
            log.exception("livingai_tasks: waking %s failed; retried next tick", execution.id)
    _count("waits_timed_out", len(report.timed_out))
    return report


def _wake_one(app: Celery, store: Store, settings: Settings, execution: Execution, by: str,
              now: float, report: WakeReport) -> None:
    _, node = _waiting_step(store, execution.id)
    if node is None:
        # WAITING, but its step is not (a redelivered copy ran it meanwhile): the ordinary
        # orphan checks take it from here, on its lease.
        store.update_execution(execution.id, status=ExecutionStatus.RUNNING,
                               if_fence=execution.fence)
        report.repaired.append(execution.id)
        return
    wait = node.metadata.get(Meta.WAIT) or {}
    state = mailbox.readiness(wait, node.id, store.nodes(execution.id), now)
    if not state:
        store.update_execution(execution.id, lease_deadline=wait.get("deadline"),
                               if_fence=execution.fence)
        report.repaired.append(execution.id)
        return
    if state == "timeout":
        marker = mailbox.timeout_marker(execution.id, str(wait.get("name")), node.id,
                                        int(wait.get("index") or 0),
                                        float(wait.get("deadline") or now),
                                        fence=execution.fence)
        _store_entry(store, marker)
    if wake(app, store, settings, execution, node, by=by,
            why=f"{wait.get('kind')} {wait.get('name')}: "
                f"{'timed out' if state == 'timeout' else 'due'}"):
        (report.timed_out if state == "timeout" else report.woken).append(execution.id)


def cancel_waiting(store: Store, execution_id: str, *, by: str, reason: str = "") -> bool:
    """Cancel a WAITING execution: claimed first (a new fence), so a send, approval or tick
    racing it cannot wake the step afterwards. False if it is not waiting."""
    execution, node = _waiting_step(store, execution_id)
    if execution is None or node is None:
        raise WaitError(f"Execution {execution_id} is not waiting "
                        f"({execution.status.value if execution else 'not found'}).")
    claim_at = max(time.time(), (execution.lease_deadline or 0.0) + 1e-3)
    if not store.claim(execution_id, fence=execution.fence, owner=by, lease_s=1.0,
                       now=claim_at):
        return False
    why = f"cancelled by {by}" + (f": {reason}" if reason else "")
    store.append([node.evolve(status=Status.CANCELLED, completed_at=utcnow(), checkpoint=None,
                              metadata={**node.metadata, Meta.FENCE: execution.fence + 1})])
    store.update_execution(execution_id, status=ExecutionStatus.CANCELLED, reason=why,
                           lease_deadline=None, attempts=execution.attempts)
    return True


# -- from the installed app (lai.send, lai.approve, lai.deny, lai.cancel) -------------------


def _installed() -> tuple[Celery, Store, Settings]:
    rt = runtime.get()
    return rt.app, rt.engine.store, rt.settings


def send(execution_id: str, name: str, payload: Any = None, *, key: str | None = None) -> bool:
    """Send event `name` (a JSON payload) to an execution: stored once per `key`, delivered
    to the step that waits for it with lai.wait_for(name), now or later. True if stored by
    this call, False for a duplicate key."""
    app, store, settings = _installed()
    return send_event(app, store, settings, execution_id, name, payload, key=key)


def approve(execution_id: str, node_id: str, *, by: str, comment: str | None = None
            ) -> ExecutionNode:
    """Approve a gated tool call: it runs, as if it had never waited."""
    app, store, settings = _installed()
    return decide_approval(app, store, settings, execution_id, node_id, approved=True, by=by,
                           comment=comment)


def deny(execution_id: str, node_id: str, *, by: str, reason: str | None = None
         ) -> ExecutionNode:
    """Deny a gated tool call: the step fails with ApprovalDenied (link_error sees it)."""
    app, store, settings = _installed()
    return decide_approval(app, store, settings, execution_id, node_id, approved=False, by=by,
                           reason=reason)


def cancel(execution_id: str, *, by: str = "operator", reason: str = "") -> bool:
    """Cancel a WAITING execution (see cancel_waiting)."""
    return cancel_waiting(_installed()[1], execution_id, by=by, reason=reason)
