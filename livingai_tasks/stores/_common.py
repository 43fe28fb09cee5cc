"""Small helpers every backend shares: argument checks and orderings."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any, Generic, TypeVar
from urllib.parse import quote, unquote

from ..errors import ConfigError, FencedOutError
from ..nodes import Execution, ExecutionNode, ExecutionStatus, utcnow
from .base import EXECUTION_FIELDS, IF_FENCE

T = TypeVar("T")


class SupersedableVersions(Generic[T]):
    """The versions this process stored that the node's next version, written by this
    process, may take the place of (ExecutionNode.is_supersedable), each by what the store
    needs to tell it is still the node's latest (Redis: its header; SQL: its row id and
    CRC). The store makes that check when it writes: a version appended since by anyone
    else stays, and the new one is appended after it. An idempotent step's input is then
    stored once even when its outcome is written after its start, as the writer's
    coalescing does within one batch. A pool child runs one step at a time: entries past
    `kept` are forgotten, oldest first (their next version is appended as usual)."""

    def __init__(self, kept: int = 256) -> None:
        self._kept = kept
        self._by_node: dict[str, T] = {}
        self._lock = threading.Lock()  # the writer thread and a caller's may both write

    def firsts(self, node_ids: Iterable[str]) -> list[T | None]:
        """For each of a batch's versions in order, what it may replace: only the first
        version of a node in the batch may."""
        seen: set[str] = set()
        out: list[T | None] = []
        for node_id in node_ids:
            out.append(None if node_id in seen else self._by_node.get(node_id))
            seen.add(node_id)
        return out

    def written(self, node: ExecutionNode, stored: T | None) -> None:
        """`node` was written (`stored`: what identifies its stored version; None: it was
        refused): it is the node's version to supersede next, if it is supersedable."""
        with self._lock:
            self._by_node.pop(node.id, None)
            if stored is not None and node.is_supersedable():
                self._by_node[node.id] = stored
                while len(self._by_node) > self._kept:
                    del self._by_node[next(iter(self._by_node))]


def check_execution_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """Validate update_execution() keywords; add updated_at; coerce status. The reserved
    `if_fence` is checked but not returned: see split_if_fence()."""
    unknown = set(changes) - EXECUTION_FIELDS - {IF_FENCE}
    if unknown:
        raise ConfigError(
            f"update_execution() cannot set {sorted(unknown)}. Accepted: "
            f"{sorted(EXECUTION_FIELDS)} and the condition {IF_FENCE!r} (the fence changes "
            "only through claim())."
        )
    split_if_fence(changes)
    out = {k: v for k, v in changes.items() if k != IF_FENCE}
    if "status" in out:
        out["status"] = ExecutionStatus(out["status"])
    out.setdefault("updated_at", utcnow())
    return out


def checked_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """check_execution_changes(), keeping the `if_fence` condition for the store to apply
    (the engine queues changes as they will be written)."""
    condition = split_if_fence(changes)
    checked = check_execution_changes(changes)
    return checked if condition is None else {**checked, IF_FENCE: condition}


def split_if_fence(changes: dict[str, Any]) -> int | None:
    """The update's `if_fence` condition (an int >= 0), or None when it has none."""
    value = changes.get(IF_FENCE)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{IF_FENCE} must be an int >= 0 (the fence the update was made "
                          f"under), got {value!r}.")
    return value


def fenced_out(node_id: str, execution_id: str, record: int, current: int) -> FencedOutError:
    """The FencedOutError for a record made under fence `record` of an execution at `current`."""
    return FencedOutError(
        f"Record {node_id!r} of execution {execution_id!r} was made under fence {record}, "
        f"but the execution is at fence {current}: it was claimed by another worker since, "
        "so this record was refused (nothing written). Stop recording this step.",
        node_id=node_id, execution_id=execution_id, record_fence=record,
        current_fence=current)


def sort_nodes(nodes: Iterable[ExecutionNode]) -> list[ExecutionNode]:
    return sorted(nodes, key=lambda n: (n.seq, n.created_at, n.id))


def order_executions(
    rows: list[Execution], status: ExecutionStatus | None, lease_expired_before: float | None
) -> list[Execution]:
    """The list_executions() filter and order, for stores that filter in Python."""
    if status is not None:
        rows = [r for r in rows if r.status == status]
    if lease_expired_before is not None:
        rows = [
            r for r in rows
            if r.lease_deadline is not None and r.lease_deadline < lease_expired_before
        ]
        return sorted(rows, key=lambda r: (r.lease_deadline or 0.0, r.id))
    return sorted(rows, key=lambda r: (r.created_at, r.id), reverse=True)


def mask_url(url: str) -> str:
    """The URL with every password replaced by ***, safe for logs, errors and repr().

    Masks the password of the URL itself and, recursively, of a URL nested URL-encoded in
    its query (a tiered store's `durable=`), and the value of any query parameter whose name
    says it is a password. A password must be URL-encoded where it holds '?' or '#' (the
    drivers need that too); an unencoded '@' or '/' in it is masked all the same.
    """
    if "://" not in url:
        return url
    scheme, rest = url.split("://", 1)
    head, sep, query = rest.partition("?")
    # The last '@' before the query ends the credentials: a password may hold '@' or '/'.
    creds, at, host = head.rpartition("@")
    if at and ":" in creds:
        head = f"{creds.split(':', 1)[0]}:***@{host}"
    if sep:
        query = "&".join(_mask_param(item) for item in query.split("&"))
    return f"{scheme}://{head}{sep}{query}"


def _mask_param(item: str) -> str:
    key, eq, value = item.partition("=")
    name = unquote(key).lower()
    if eq and "password" in name:
        return f"{key}=***"
    if eq and name == "durable":  # a nested store URL, URL-encoded: mask it and re-encode
        return f"{key}={quote(mask_url(unquote(value)), safe='')}"
    return item


def check_page(limit: int, offset: int) -> None:
    if not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be an int >= 1, got {limit!r}.")
    if not isinstance(offset, int) or offset < 0:
        raise ConfigError(f"offset must be an int >= 0, got {offset!r}.")
