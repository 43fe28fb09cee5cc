"""An operator's decision on a journaled call of unknown outcome (the step is held).

`resolve()` here is the one `lai.resolve` and `livingai-tasks resolve` call: a step's node
goes to recover.resolve() as before; a call's node is decided here, with the same rules
(a claim on the fence first; `retry` refused while the last attempt's worker may be alive,
unless forced), and then its step is published again: on that re-run the resolved call
returns the operator's output (done) or runs again (retry), and every call recorded
before it returns its recorded result.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from ..errors import ResolveError
from ..journal import is_call
from ..nodes import ExecutionNode, ExecutionStatus, Meta, Status, dumps_json, utcnow
from ..stores import Store
from .recover import claim_to_resolve, republish
from .recover import resolve as resolve_step

__all__ = ["resolve"]

_UNDECIDED = (Status.IN_DOUBT, Status.CRASHED, Status.RUNNING)


def resolve(app: Celery, store: Store, execution_id: str, node_id: str, *,
            output: Any = None, done: bool = False, retry: bool = False,
            owner: str = "operator", force: bool = False) -> ExecutionNode:
    """Decide an IN_DOUBT step (recover.resolve) or an IN_DOUBT journaled call of a step:
    done=True, the call happened and `output` is its result; retry=True, it did not and
    runs again (with the same lai.idempotency_key()). Returns the node's new version.
    ResolveError when the node does not fit, or (retry) while its last attempt may run."""
    node = store.get_node(node_id)
    if node is None or not is_call(node):
        return resolve_step(app, store, execution_id, node_id, output=output, done=done,
                            retry=retry, owner=owner, force=force)
    if done == retry:
        raise ResolveError("resolve() needs exactly one of done=True (with output=...) or "
                           "retry=True.")
    if node.execution_id != execution_id:
        raise ResolveError(f"No node {node_id!r} in execution {execution_id!r}.")
    if node.status not in _UNDECIDED:
        raise ResolveError(f"Call {node_id} is {node.status.value}; only IN_DOUBT (or "
                           "crashed) calls can be resolved.")
    step = store.get_node(str(node.metadata[Meta.CALL_OF]))
    execution = store.get_execution(execution_id)
    if step is None or execution is None:
        raise ResolveError(f"Call {node_id} names step {node.metadata[Meta.CALL_OF]!r} of "
                           f"execution {execution_id!r}, and it is not on record.")
    if step.status not in _UNDECIDED:
        raise ResolveError(f"Call {node_id}'s step {step.id} is {step.status.value}: it "
                           "finished, so its call needs no decision.")
    if done:
        dumps_json(output, what="resolve output")
    fence = claim_to_resolve(store, execution, node, f"Call {node_id}", retry=retry,
                             force=force, owner=owner)
    decided = {Meta.FENCE: fence, Meta.RESOLVED_BY: owner,
               Meta.RESOLVED_AT: utcnow().isoformat()}
    new_call = (node.evolve(status=Status.SUCCESS, output=output, completed_at=utcnow(),
                            checkpoint=None, metadata={**node.metadata, **decided,
                                                       Meta.RESOLUTION: "done"}) if done
                else node.evolve(status=Status.IN_DOUBT, checkpoint=None,
                                 metadata={**node.metadata, **decided,
                                           Meta.RESOLUTION: "retry"}))
    # The step runs again in either case (its entry check sees the operator's decision);
    # on that run its journal replays up to the call and goes on from it.
    new_step = step.evolve(status=Status.IN_DOUBT, checkpoint=None,
                           metadata={**step.metadata, **decided, Meta.RESOLUTION: "retry"})
    store.append([new_call, new_step])
    store.update_execution(execution_id, status=ExecutionStatus.RUNNING,
                           reason=f"call {node_id} resolved by {owner}: "
                                  f"{'done' if done else 'retry'}")
    republish(app, new_step, fence)
    return new_call
