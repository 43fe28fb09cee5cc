"""An execution's mailbox: the events sent to it, kept as nodes of the execution. No I/O here.

Why nodes, not a table of their own: every store already keeps nodes durably, reads an
execution's nodes in one call, and refuses a version made under an older fence. An event
is a MEMORY node whose id is derived from (execution, name, key), so a sender that retries
with the same key names the same node and a second copy is recognised (exactly once per
key); an event sent before any step waits for it simply waits in the record (a mailbox).

Delivery is deterministic, because a woken step runs again from its start: the k-th
`wait_for(name)` call of one run of a step receives the k-th entry named `name` that no
other step has received, in arrival order (created_at, then id). The entry is then marked
as received by that step (`consumed_by`), so a later run of the same step receives the
same entries again, in the same order, and another step does not.

Timers and timeouts are entries too: a sleep records its due time as an entry the first
time it is reached (a re-run finds the same due time), and a wait that times out gets a
timeout marker at its index, so a re-run raises the same WaitTimeout at the same call.
Names starting with "lai." are the library's own (approval decisions, sleeps).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from typing import Any

from .errors import WaitError
from .nodes import ExecutionNode, Meta, NodeType, Status, utcnow

__all__ = ["APPROVAL", "SLEEP", "START_AFTER", "entry_id", "make_entry", "is_entry", "entries",
           "is_timeout", "timeout_marker", "wait_info", "readiness", "user_name", "steps_only"]

APPROVAL = "lai.approval"  # an approval gate's decision, addressed to its step
SLEEP = "lai.sleep"  # a durable sleep's due time
START_AFTER = "lai.start_after"  # the due time of a step declared with start_after=
_NAMESPACE = uuid.UUID("5d0c7a8e-2f7b-4f51-9d3a-6c1f1b0e7a20")
_TIMEOUT = "lai_timeout"  # the payload key of a timeout marker


def user_name(name: Any) -> str:
    """An event name a user may send or wait for: a non-empty str, not under "lai."."""
    if not isinstance(name, str) or not name or len(name) > 200:
        raise WaitError(f"An event name is a non-empty string of up to 200 characters, got "
                        f"{name!r}.")
    if name.startswith("lai."):
        raise WaitError(f"Event names starting with 'lai.' are reserved for the library's own "
                        f"entries (approvals, sleeps); got {name!r}.")
    return name


def entry_id(execution_id: str, name: str, key: str) -> str:
    """The node id of the entry (execution, name, key): the same for every retry."""
    return str(uuid.uuid5(_NAMESPACE, f"{execution_id}\x00{name}\x00{key}"))


def make_entry(execution_id: str, name: str, payload: Any, key: str, *, fence: int,
               consumed_by: str | None = None) -> ExecutionNode:
    meta: dict[str, Any] = {Meta.EVENT: name, Meta.EVENT_KEY: key, Meta.FENCE: fence,
                            Meta.IDEMPOTENT: True}
    if consumed_by is not None:
        meta[Meta.CONSUMED_BY] = consumed_by
    now = utcnow()
    return ExecutionNode(execution_id=execution_id, type=NodeType.MEMORY,
                         id=entry_id(execution_id, name, key), seq=0, status=Status.SUCCESS,
                         created_at=now, completed_at=now, output=payload, metadata=meta)


def is_entry(node: ExecutionNode) -> bool:
    return Meta.EVENT in node.metadata


def steps_only(nodes: Iterable[ExecutionNode]) -> list[ExecutionNode]:
    """An execution's nodes without its mailbox: what recovery and replay plan on."""
    return [n for n in nodes if not is_entry(n)]


def entries(nodes: Iterable[ExecutionNode], name: str, step_id: str) -> list[ExecutionNode]:
    """The entries named `name` that `step_id` may receive, in delivery order."""
    found = [n for n in nodes if n.metadata.get(Meta.EVENT) == name
             and n.metadata.get(Meta.CONSUMED_BY) in (None, step_id)]
    return sorted(found, key=lambda n: (n.created_at, n.id))


def timeout_marker(execution_id: str, name: str, step_id: str, index: int, deadline: float,
                   *, fence: int) -> ExecutionNode:
    """The entry a timed-out wait receives at its index: WaitTimeout, on every re-run."""
    return make_entry(execution_id, name, {_TIMEOUT: deadline},
                      f"timeout:{step_id}:{index}", fence=fence, consumed_by=step_id)


def is_timeout(entry: ExecutionNode) -> bool:
    return isinstance(entry.output, dict) and _TIMEOUT in entry.output and \
        entry.metadata.get(Meta.EVENT_KEY, "").startswith("timeout:")


def wait_info(kind: str, name: str, index: int, deadline: float | None,
              **extra: Any) -> dict[str, Any]:
    """What a WAITING step records under Meta.WAIT."""
    return {"kind": kind, "name": name, "index": index, "deadline": deadline,
            "since": utcnow().isoformat(), **extra}


def readiness(wait: dict[str, Any], step_id: str, nodes: Iterable[ExecutionNode],
              now: float) -> str:
    """Whether a WAITING step can go on: "ready" (what it waits for is there, or its
    sleep is due), "timeout" (its deadline passed without it) or "" (not yet)."""
    deadline = wait.get("deadline")
    if wait.get("kind") == "sleep":
        return "ready" if deadline is not None and float(deadline) <= now else ""
    got = entries(nodes, str(wait.get("name")), step_id)
    if len(got) > int(wait.get("index") or 0):
        return "ready"
    if deadline is not None and float(deadline) <= now:
        return "timeout"
    return ""
