"""RecoveryEngine: decide how to resume an execution, from the durable record alone.

Pure planning: plan() reads the store and returns a RecoveryPlan; it publishes nothing and
writes nothing, so it is testable on hand-made records and safe to run as a dry run.
Acting on a plan is resume.py's job.

In Celery terms every resume is "publish a recorded step's message again, same task id and
same continuation"; the step's own entry check then does the right thing: an idempotent
step that crashed runs again, a step that already succeeded returns its recorded output
(so the chain goes on without running it), a tool whose outcome is unknown is not run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from .codec import decode
from .errors import CodecError
from .journal import is_call
from .mailbox import steps_only
from .nodes import Execution, ExecutionNode, ExecutionStatus, Meta, Status
from .stores import Store

__all__ = ["RecoveryEngine", "RecoveryPlan", "Action"]

_UNFINISHED = (Status.RUNNING, Status.CRASHED, Status.PENDING)


class Action(str, Enum):
    RESUME = "RESUME"  # publish `resume_nodes` again
    HOLD = "HOLD"  # a tool's outcome is unknown: IN_DOUBT until reconciled or resolved
    COMPLETE = "COMPLETE"  # every step is done: only the summary was behind
    FAIL = "FAIL"  # attempts exhausted, or nothing recorded to resume from
    WAIT = "WAIT"  # not orphaned (yet): a step is retrying, or too recent to call stuck


@dataclass(frozen=True)
class RecoveryPlan:
    """What recovery would do with one execution, and why.

    `resume_node_id`, `replay_nodes` and `skipped_nodes` keep livingai 0.4.x's names:
    replay_nodes are the idempotent (or reconcilable) steps that run again, skipped_nodes
    the finished non-idempotent tools that do not (their recorded outputs feed what comes
    next). New here: `in_doubt_nodes`, `resume_nodes` (the messages to publish again) and a
    human-readable `reason`.
    """

    execution_id: str
    action: Action
    reason: str
    found: bool = True
    resume_nodes: list[ExecutionNode] = field(default_factory=list)
    replay_nodes: list[ExecutionNode] = field(default_factory=list)
    skipped_nodes: list[ExecutionNode] = field(default_factory=list)
    in_doubt_nodes: list[ExecutionNode] = field(default_factory=list)
    checkpoint_node: ExecutionNode | None = None
    state: bytes | None = None
    resume_canvas: bool = False  # publish the canvas start() recorded: no step ever ran

    @property
    def resume_node_id(self) -> str | None:
        return self.resume_nodes[0].id if self.resume_nodes else None

    def to_dict(self) -> dict[str, Any]:
        def ids(nodes: list[ExecutionNode]) -> list[str]:
            return [n.id for n in nodes]

        return {"execution_id": self.execution_id, "action": self.action.value,
                "reason": self.reason, "found": self.found,
                "resume_node_id": self.resume_node_id, "resume_nodes": ids(self.resume_nodes),
                "replay_nodes": ids(self.replay_nodes), "skipped_nodes": ids(self.skipped_nodes),
                "in_doubt_nodes": ids(self.in_doubt_nodes),
                "resume_canvas": self.resume_canvas,
                "checkpoint_node": self.checkpoint_node.id if self.checkpoint_node else None}


def _has_continuation(node: ExecutionNode) -> bool:
    request = node.metadata.get(Meta.REQUEST) or {}
    return bool(request.get("chain") or request.get("callbacks") or request.get("chord"))


def _next_step_id(node: ExecutionNode) -> str | None:
    """The task id of the step a chain runs after `node` (Celery freezes a chain's ids)."""
    chain = (node.metadata.get(Meta.REQUEST) or {}).get("chain")
    if not isinstance(chain, list) or not chain or not isinstance(chain[-1], dict):
        return None
    options = chain[-1].get("options")
    task_id = options.get("task_id") if isinstance(options, dict) else None
    return task_id if isinstance(task_id, str) else None


def _returned(nodes: list[ExecutionNode]) -> set[str]:
    """Unfinished idempotent steps whose chain's next step is on record: Celery publishes
    that step only once the body returned, so it ran, and its outcome's record was lost
    with its process (a step's outcome waits in memory for the process's next step, on
    Redis). The next step carries its output: it is not run again."""
    ids = {n.id for n in nodes}
    return {n.id for n in nodes if n.status in _UNFINISHED and n.is_idempotent()
            and _next_step_id(n) in ids}


def _can_rerun(node: ExecutionNode) -> bool:
    return (node.is_idempotent() or bool(node.metadata.get(Meta.RECONCILABLE))
            or node.metadata.get(Meta.RESOLUTION) == "retry")


class RecoveryEngine:
    def __init__(self, store: Store, *, max_attempts: int = 3, max_recoveries: int = 10,
                 stuck_after_s: float = 60.0):
        self.store = store
        self.max_attempts = max_attempts  # crashed attempts of one step
        self.max_recoveries = max_recoveries  # recoveries of the whole execution
        self.stuck_after_s = stuck_after_s

    def plan(self, execution_id: str, *, now: float | None = None,
             holder_died: bool = False) -> RecoveryPlan:
        """What to do with an orphaned execution. `holder_died`: the worker that held its
        next message (reserved, prefetched, or a retry waiting for its countdown) is known
        to be dead, so nothing is still queued for it: no stuck or retry wait applies."""
        now = time.time() if now is None else now
        execution = self.store.get_execution(execution_id)
        # Events are not steps, and a step's journaled calls are its own business: the
        # step's re-run replays them.
        nodes = [n for n in steps_only(self.store.nodes(execution_id)) if not is_call(n)]
        if execution is None and not nodes:
            return RecoveryPlan(execution_id, Action.FAIL, "no record of this execution",
                                found=False)
        checkpoint_node, state = self._checkpoint(execution_id)
        plan = self._decide(execution, nodes, now, 0.0 if holder_died else self.stuck_after_s)
        return RecoveryPlan(**{**plan.__dict__, "checkpoint_node": checkpoint_node,
                               "state": state})

    def _checkpoint(self, execution_id: str) -> tuple[ExecutionNode | None, bytes | None]:
        node = self.store.latest_checkpoint(execution_id)
        if node is None or node.checkpoint is None:
            return node, None
        try:
            return node, decode(node.checkpoint, node_id=node.id)
        except CodecError:
            return node, None  # the step itself will meet the error, with the node named

    def _decide(self, execution: Execution | None, nodes: list[ExecutionNode],
                now: float, stuck_after_s: float) -> RecoveryPlan:
        eid = execution.id if execution else nodes[0].execution_id
        skipped = [n for n in nodes if n.status in (Status.SUCCESS, Status.SKIPPED)
                   and not n.is_idempotent()]
        attempts = execution.attempts if execution else 0
        if execution is not None and execution.status is not ExecutionStatus.RUNNING:
            return RecoveryPlan(eid, Action.WAIT, f"execution is {execution.status.value}")
        if attempts >= self.max_recoveries:
            return RecoveryPlan(eid, Action.FAIL, f"gave up after {attempts} recoveries "
                                f"(max_recoveries={self.max_recoveries})", skipped_nodes=skipped)
        # A retry is Celery's to deliver, until it is overdue: then the worker holding it
        # died (the retry message waits unacked on it), and it counts as crashed.
        overdue = [n for n in nodes if n.status is Status.RETRYING
                   and float(n.metadata.get(Meta.RETRY_DUE) or 0) + stuck_after_s < now]
        if any(n.status is Status.RETRYING and n not in overdue for n in nodes):
            return RecoveryPlan(eid, Action.WAIT, "a step is waiting for its Celery retry")
        returned = _returned(nodes)
        unfinished = [n for n in nodes if n.status in _UNFINISHED
                      and n.id not in returned] + overdue
        in_doubt = [n for n in nodes if n.status is Status.IN_DOUBT and not _can_rerun(n)]
        in_doubt += [n for n in unfinished if not _can_rerun(n)]
        rerun = [n for n in unfinished if _can_rerun(n)]
        rerun += [n for n in nodes if n.status is Status.IN_DOUBT and _can_rerun(n)]
        poisoned = [n for n in rerun if int(n.metadata.get(Meta.ATTEMPT, 0)) >= self.max_attempts]
        # A WAITING step in a RUNNING execution was being woken when the waker died (after
        # its claim, before or with its publish): running it again only re-checks its wait.
        rerun += [n for n in nodes if n.status is Status.WAITING]
        if poisoned:
            n = poisoned[0]
            return RecoveryPlan(eid, Action.FAIL, f"step {n.metadata.get(Meta.TASK)} ({n.id}) "
                                f"crashed in each of its {n.metadata.get(Meta.ATTEMPT)} attempts "
                                f"(max_attempts={self.max_attempts})",
                                skipped_nodes=skipped, in_doubt_nodes=in_doubt)
        if in_doubt:
            names = ", ".join(f"{n.metadata.get(Meta.TASK)} ({n.id})" for n in in_doubt)
            return RecoveryPlan(eid, Action.HOLD, f"non-idempotent tool step(s) {names} started "
                                "and their worker died: the side effect may or may not have "
                                "happened. Resolve with `livingai-tasks resolve EXECUTION NODE "
                                "--app <module:app> --done OUTPUT` or `--retry`",
                                resume_nodes=rerun, replay_nodes=rerun, skipped_nodes=skipped,
                                in_doubt_nodes=in_doubt)
        if rerun:
            names = ", ".join(f"{n.metadata.get(Meta.TASK)} ({n.id})" for n in rerun)
            return RecoveryPlan(eid, Action.RESUME, f"re-running crashed step(s) {names}",
                                resume_nodes=rerun, replay_nodes=rerun, skipped_nodes=skipped)
        if not nodes:
            if execution is not None and execution.metadata.get(Meta.CANVAS):
                return RecoveryPlan(eid, Action.RESUME, "its first step never started (its "
                                    "message was lost): publishing the recorded canvas again",
                                    resume_canvas=True)
            return RecoveryPlan(eid, Action.FAIL, "no step was ever recorded for it")
        last = max(nodes, key=lambda n: (n.seq, n.completed_at or n.created_at))
        if last.status is Status.FAILED or last.status is Status.CANCELLED:
            return RecoveryPlan(eid, Action.WAIT, f"its last step is {last.status.value}")
        if not _has_continuation(last):
            return RecoveryPlan(eid, Action.COMPLETE, "every step finished",
                                skipped_nodes=skipped)
        done_at = (last.completed_at or last.created_at).timestamp()
        if now - done_at < stuck_after_s:
            return RecoveryPlan(eid, Action.WAIT, "the next step may still be queued")
        return RecoveryPlan(eid, Action.RESUME, f"the step after {last.metadata.get(Meta.TASK)} "
                            f"({last.id}) never started: replaying its recorded output to "
                            "publish the rest of the canvas", resume_nodes=[last],
                            skipped_nodes=skipped)
