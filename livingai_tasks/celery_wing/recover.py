"""Acting on recovery plans: claim, publish again, record. Also the operator's resolve().

Recovery never runs a step inline: it publishes the recorded step message again (same task
id, same chain/chord/callbacks, and a higher fence), and a worker picks it up. The claim
(compare-and-set on the execution's fence) makes two recovery ticks, two beats, or beat
racing Celery's own redelivery resume an execution once: the loser's claim fails, and a
message carrying an older fence is recognised as stale by the step's entry check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

from celery import Celery, signature
from celery.utils.saferepr import saferepr

from ..errors import (
    ConfigError,
    CorruptRecordError,
    LivingAIError,
    ResolveError,
    StoreUnavailableError,
)
from ..nodes import Execution, ExecutionNode, ExecutionStatus, Meta, Status, dumps_json, utcnow
from ..recovery import Action, RecoveryEngine, RecoveryPlan
from ..settings import Settings
from ..stores import Store, SweepsHotTier, TracksWorkers
from ..stores.corrupt import SkippedRecord, collect_skipped
from . import context
from .messages import StepIdentity, tag_kwargsrepr
from .steps import spec_of
from .worker_deaths import WorkerDeaths

__all__ = ["recover_once", "republish", "resolve", "claim_to_resolve", "RecoveryReport"]

log = logging.getLogger("livingai_tasks.recovery")


@dataclass
class RecoveryReport:
    """What one recovery tick found and did (also what `recover --dry-run` prints)."""

    scanned: int = 0
    plans: list[RecoveryPlan] = field(default_factory=list)
    claimed: list[str] = field(default_factory=list)
    lost_claims: list[str] = field(default_factory=list)
    published: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)  # records that could not be read
    in_doubt: list[str] = field(default_factory=list)  # executions this tick held IN_DOUBT
    held_back: bool = False  # only planned: the store was unreachable a moment ago

    def to_dict(self) -> dict[str, Any]:
        return {"scanned": self.scanned, "plans": [p.to_dict() for p in self.plans],
                "claimed": self.claimed, "lost_claims": self.lost_claims,
                "published": self.published, "unreadable": self.unreadable,
                "in_doubt": self.in_doubt, "held_back": self.held_back}


_reported: set[str] = set()  # executions whose unreadable record this process has logged


def _report_unreadable(execution_id: str, exc: Exception) -> None:
    """Log once per process: the same record fails on every tick until someone repairs it."""
    if execution_id in _reported:
        return
    if len(_reported) > 10_000:
        _reported.clear()
    _reported.add(execution_id)
    log.error("livingai_tasks: execution %s cannot be recovered, its record cannot be read "
              "(%s: %s); recovery goes on with the others. `livingai-tasks show %s` shows "
              "what can be read.", execution_id, type(exc).__name__, exc, execution_id)


def republish(app: Celery, node: ExecutionNode, fence: int) -> None:
    """Send a recorded step's message again: same task id, args, continuation; new fence."""
    request = node.metadata.get(Meta.REQUEST) or {}
    inputs = node.input if isinstance(node.input, dict) else {}
    options: dict[str, Any] = {}
    routing_key = (request.get("delivery_info") or {}).get("routing_key")
    if routing_key:
        options["queue"] = routing_key
    identity = StepIdentity.of_node(node, fence)
    kwargs = inputs.get("kwargs", {})
    app.send_task(
        request.get("task") or node.metadata[Meta.TASK],
        args=inputs.get("args", []), kwargs=kwargs, task_id=node.id,
        headers=identity.to_headers(),
        kwargsrepr=tag_kwargsrepr(saferepr(kwargs, 1024), identity, node.type),
        chain=request.get("chain"), link=request.get("callbacks"),
        link_error=request.get("errbacks"), chord=request.get("chord"),
        group_id=request.get("group"), group_index=request.get("group_index"),
        root_id=request.get("root_id"), parent_id=request.get("parent_id"), **options,
    )


def _fence_nodes(store: Store, nodes: list[ExecutionNode], fence: int, status: Status,
                 note: dict[str, Any]) -> list[ExecutionNode]:
    """A new version of each node carrying the new fence, so older copies read as stale."""
    fenced = []
    for node in nodes:
        new_status = status if node.status in (Status.RUNNING, Status.PENDING) else node.status
        fenced.append(node.evolve(status=new_status, checkpoint=None,
                                  metadata={**node.metadata, Meta.FENCE: fence, **note}))
    if fenced:
        store.append(fenced)
    return fenced


class _Outage:
    """When this process last found the store unreachable (a recovery tick failed)."""

    def __init__(self) -> None:
        self.last = -1e18

    def seen(self, at: float | None = None) -> None:
        self.last = max(self.last, time.monotonic() if at is None else at)

    def grace(self, settings: Settings) -> bool:
        """Within the time every worker needs to renew after the store is back."""
        renew = max(settings.worker_ttl_s, settings.heartbeat_s) + settings.recovery_interval_s
        return time.monotonic() - self.last < renew


_outage = _Outage()


def _attempt_may_be_alive(store: Store, execution: Execution, node: ExecutionNode,
                          now: float) -> str:
    """Why the worker of the node's last attempt may still be alive ("" if it is not)."""
    if execution.lease_deadline is not None and execution.lease_deadline > now:
        return (f"the execution's lease, held by {execution.lease_owner}, runs "
                f"{execution.lease_deadline - now:.0f} s more")
    worker = node.metadata.get(Meta.WORKER)
    if worker and isinstance(store, TracksWorkers):
        record = store.worker(str(worker))
        if record is not None and record.expires_at > now:
            return f"its worker {worker} still renews its liveness"
    return ""


def _dead_workers(store: Store, settings: Settings, now: float, listed: set[str],
                  orphans: list[Execution],
                  unreadable: Callable[[str, Exception], None], *,
                  after_outage: bool) -> WorkerDeaths:
    """The dead workers' holdings; their RUNNING executions join `orphans` (in place). A
    held execution whose record is corrupt goes to `unreadable` instead."""
    deaths = WorkerDeaths.read(store, now, settings.recovery_page, after_outage=after_outage)
    if not deaths.records:
        return deaths
    for execution_id in deaths.held():
        if execution_id not in listed and len(orphans) < 2 * settings.recovery_page:
            try:
                execution = store.get_execution(execution_id)
            except CorruptRecordError as exc:
                unreadable(exc.execution_id, exc)
                continue
            if execution is not None and execution.status is ExecutionStatus.RUNNING:
                orphans.append(execution)
                listed.add(execution_id)
    # A step its worker took in the last instant before dying may be missing from the
    # record; its lease names the dead process all the same.
    renewed = store.list_executions(status=ExecutionStatus.RUNNING,
                                    lease_expired_before=now + settings.lease_s + 1,
                                    limit=2 * settings.recovery_page)
    for execution in renewed:
        if execution.id not in listed and deaths.adopt(execution):
            orphans.append(execution)
            listed.add(execution.id)
    return deaths


def recover_once(app: Celery | None, store: Store, settings: Settings, *, owner: str,
                 dry_run: bool = False, now: float | None = None,
                 store_failed_at: float = 0.0) -> RecoveryReport:
    """One recovery tick: a page (`recovery_page`) of RUNNING executions whose lease has
    expired, each planned, claimed, and acted on (published on `app`), under `settings`'
    caps and timings. A dry run only plans, and needs no app. `store_failed_at` is when
    this process last saw the store fail otherwise (time.monotonic()): a tick that runs
    right after an outage it did not see itself (its process was busy with a step whose
    writes failed) must not take the workers that could not renew for dead."""
    if app is None and not dry_run:
        raise ConfigError("recover_once() needs the Celery app to publish on, unless dry_run.")
    now = time.time() if now is None else now
    if store_failed_at:
        _outage.seen(store_failed_at)
    if not dry_run:
        _sweep_hot_tier(store)
    planner = RecoveryEngine(store, max_attempts=settings.max_attempts,
                             max_recoveries=settings.max_recoveries,
                             stuck_after_s=settings.stuck_after_s)
    lease_s = max(settings.lease_s, settings.stuck_after_s)
    report = RecoveryReport()

    def unreadable(execution_id: str, exc: Exception) -> None:
        # A corrupt record (a truncated body, a bad blob, a checksum mismatch): contained to
        # its execution, counted on every tick, logged once per process.
        if execution_id not in report.unreadable:
            report.unreadable.append(execution_id)
        _report_unreadable(execution_id, exc)

    try:
        with collect_skipped() as skipped:  # corrupt rows the listings leave out
            orphans = store.list_executions(status=ExecutionStatus.RUNNING,
                                            lease_expired_before=now,
                                            limit=settings.recovery_page)
    except StoreUnavailableError:
        _outage.seen()
        raise
    _skipped_rows(skipped, unreadable)
    if _outage.grace(settings):
        # The store was unreachable a moment ago: workers could not renew their leases and
        # liveness through it, so expired ones prove nothing yet. Plan only, until each
        # had a chance to renew (a real crash is resumed a few seconds later).
        dry_run = True
        report.held_back = True
    dead = _dead_workers(store, settings, now, {e.id for e in orphans}, orphans, unreadable,
                         after_outage=report.held_back)
    report.scanned = len(orphans)
    for execution in orphans:
        holder = dead.holder_of(execution.id)
        # Trust only what this row says: its fence and lease were read together, so a row
        # whose lease is live was claimed or renewed after the listing, and is not ours,
        # unless the dead worker that held it (or recovery's own claim of it) holds the lease.
        claim_at = dead.claim_time(execution, now)
        if claim_at is None:
            continue
        try:
            plan = planner.plan(execution.id, now=now, holder_died=holder is not None)
        except StoreUnavailableError:
            _outage.seen()
            raise
        except (LivingAIError, ValueError) as exc:
            unreadable(execution.id, exc)
            dead.unsettled(execution.id)
            continue
        report.plans.append(plan)
        if dry_run or plan.action is Action.WAIT:
            dead.unsettled(execution.id)
            continue
        # The claim's lease gives the step we publish time to start and take the lease over.
        if not store.claim(execution.id, fence=execution.fence, owner=owner, lease_s=lease_s,
                           now=claim_at):
            report.lost_claims.append(execution.id)
            continue
        report.claimed.append(execution.id)
        fence = execution.fence + 1
        try:
            _act(cast(Celery, app), store, plan, fence, owner, report)
        except Exception:  # noqa: BLE001 - one bad execution must not stop the page
            log.exception("livingai_tasks: recovering %s failed; it is retried next tick",
                          execution.id)
    if not dry_run:
        dead.forget_settled()
    return report


def _skipped_rows(skipped: list[SkippedRecord],
                  unreadable: Callable[[str, Exception], None]) -> None:
    for row in skipped:
        unreadable(row.execution_id, CorruptRecordError(row.reason, key=row.key,
                                                        execution_id=row.execution_id))


def _sweep_hot_tier(store: Store) -> None:
    # A tiered store's Redis may hold stale copies of keys a process missed during an outage
    # and did not live to delete; the plans below read the latest checkpoint from it.
    if not isinstance(store, SweepsHotTier):
        return
    try:
        swept = store.sweep_hot_tier()
    except Exception:  # noqa: BLE001 - upkeep must never stop recovery
        log.exception("livingai_tasks: sweeping %s's hot tier failed; recovery goes on",
                      store.url)
        return
    if swept:
        log.info("livingai_tasks: deleted %d stale Redis copies recorded as missed", swept)


# Celery's own canvas tasks, which a stored canvas may name around the steps.
_CANVAS_TASKS = frozenset({"celery.chain", "celery.group", "celery.chord"})


def _task_names(canvas: Any) -> set[str]:
    """Every task a stored canvas (a signature as a dict) would publish."""
    names: set[str] = set()
    if isinstance(canvas, dict):
        if isinstance(canvas.get("task"), str):
            names.add(canvas["task"])
        for value in canvas.values():
            names |= _task_names(value)
    elif isinstance(canvas, list):
        for item in canvas:
            names |= _task_names(item)
    return names


def _not_steps(names: set[str]) -> list[str]:
    """The names that are not registered steps: a record naming one was not written by
    a step (a forged or corrupt record), and recovery must not publish it."""
    return sorted(n for n in names if n not in _CANVAS_TASKS and spec_of(n) is None)


def _act(app: Celery, store: Store, plan: RecoveryPlan, fence: int, owner: str,
         report: RecoveryReport) -> None:
    eid = plan.execution_id
    note = {Meta.RECOVERED_BY: owner, Meta.RECOVERED_AT: utcnow().isoformat()}
    if plan.action is Action.RESUME:
        execution = store.get_execution(eid) if plan.resume_canvas else None
        names = (_task_names(execution.metadata.get(Meta.CANVAS)) if execution else set()) | \
            {str((n.metadata.get(Meta.REQUEST) or {}).get("task") or n.metadata.get(Meta.TASK))
             for n in plan.resume_nodes}
        foreign = _not_steps(names)
        if foreign:
            # Not failed here: the process running recovery may only lack the import. The
            # claim's lease runs out and max_recoveries ends a record that never resolves.
            reason = (f"recovery refused to publish {', '.join(foreign)}: not a registered "
                      "step in this process (import the module that defines it where "
                      "recovery runs, or the record is not one a step wrote)")
            store.update_execution(eid, reason=reason)
            log.error("livingai_tasks: %s not resumed: %s", eid, reason)
            return
    if plan.action is Action.RESUME and plan.resume_canvas:
        execution = store.get_execution(eid)
        canvas = signature(execution.metadata[Meta.CANVAS], app=app) if execution else None
        if canvas is not None:
            # Same task ids as the lost message; a late copy of it meets the recorded steps.
            context.local.publish = StepIdentity(eid, fence=fence)
            try:
                canvas.apply_async()
            finally:
                context.local.publish = None
            report.published.append(f"canvas:{eid}")
        store.update_execution(eid, reason=plan.reason)
        log.info("livingai_tasks: resumed %s: %s", eid, plan.reason)
    elif plan.action is Action.RESUME:
        for node in _fence_nodes(store, plan.resume_nodes, fence, Status.CRASHED, note):
            republish(app, node, fence)
            report.published.append(node.id)
        store.update_execution(eid, reason=plan.reason)
        log.info("livingai_tasks: resumed %s: %s", eid, plan.reason)
    elif plan.action is Action.HOLD:
        held = [n.evolve(status=Status.IN_DOUBT, checkpoint=None,
                         metadata={**n.metadata, Meta.FENCE: fence,
                                   Meta.IN_DOUBT_REASON: plan.reason})
                for n in plan.in_doubt_nodes if n.status is not Status.IN_DOUBT]
        if held:
            store.append(held)
        store.update_execution(eid, status=ExecutionStatus.IN_DOUBT, reason=plan.reason,
                               lease_deadline=None)
        log.warning("livingai_tasks: %s is IN_DOUBT: %s", eid, plan.reason)
        report.in_doubt.append(eid)
    elif plan.action is Action.COMPLETE:
        store.update_execution(eid, status=ExecutionStatus.COMPLETED, lease_deadline=None)
    elif plan.action is Action.FAIL:
        store.update_execution(eid, status=ExecutionStatus.FAILED, reason=plan.reason,
                               lease_deadline=None)
        log.error("livingai_tasks: %s FAILED: %s", eid, plan.reason)


def claim_to_resolve(store: Store, execution: Execution, node: ExecutionNode, what: str, *,
                     retry: bool, force: bool, owner: str) -> int:
    """The claim an operator's decision on `node` makes (a step's or a journaled call's);
    its new fence. A retry is refused while the last attempt's worker may still be alive
    (it could make the call a second time), unless `force`."""
    now = time.time()
    alive = _attempt_may_be_alive(store, execution, node, now)
    if retry and alive and not force:
        raise ResolveError(f"{what}'s last attempt may still be running: {alive}. "
                           "Retrying now could make the call twice; wait until it is dead, or "
                           "pass force=True (--force) if you know it is.")
    claim_at = max(now, (execution.lease_deadline or 0.0) + 1e-3) if force else now
    if not store.claim(execution.id, fence=execution.fence, owner=owner, lease_s=60.0,
                       now=claim_at):
        raise ResolveError(f"Execution {execution.id} changed while resolving; try again.")
    return execution.fence + 1


def resolve(app: Celery, store: Store, execution_id: str, node_id: str, *,
            output: Any = None, done: bool = False, retry: bool = False,
            owner: str = "operator", force: bool = False) -> ExecutionNode:
    """An operator's decision on a tool step whose outcome was unknown.

    done=True: the side effect happened; `output` becomes the step's recorded output and
    the rest of the canvas runs with it. retry=True: it did not happen; the step runs again
    (with the same idempotency key). Raises ResolveError if the node is not held, and, for
    retry, while the worker of its last attempt may still be alive (its lease or its
    worker's liveness is current: a paused worker could still make the call), unless
    force=True.
    """
    if done == retry:
        raise ResolveError("resolve() needs exactly one of done=True (with output=...) or "
                           "retry=True.")
    node = store.get_node(node_id)
    if node is None or node.execution_id != execution_id:
        raise ResolveError(f"No node {node_id!r} in execution {execution_id!r}.")
    if node.status not in (Status.IN_DOUBT, Status.CRASHED, Status.RUNNING):
        raise ResolveError(f"Node {node_id} is {node.status.value}; only IN_DOUBT (or crashed) "
                           "steps can be resolved.")
    execution = store.get_execution(execution_id)
    if execution is None:
        raise ResolveError(f"No execution {execution_id!r}.")
    if done:
        dumps_json(output, what="resolve output")
    fence = claim_to_resolve(store, execution, node, f"Node {node_id}", retry=retry,
                             force=force, owner=owner)
    meta = {**node.metadata, Meta.FENCE: fence, Meta.RESOLUTION: "done" if done else "retry",
            Meta.RESOLVED_BY: owner, Meta.RESOLVED_AT: utcnow().isoformat()}
    new = (node.evolve(status=Status.SUCCESS, output=output, completed_at=utcnow(),
                       checkpoint=None, metadata=meta) if done
           else node.evolve(status=Status.IN_DOUBT, checkpoint=None, metadata=meta))
    store.append([new])
    store.update_execution(execution_id, status=ExecutionStatus.RUNNING,
                           reason=f"resolved by {owner}: {'done' if done else 'retry'}")
    republish(app, new, fence)
    return new
