"""Small helpers every backend shares: argument checks and orderings."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import ConfigError
from ..nodes import Execution, ExecutionNode, ExecutionStatus, utcnow
from .base import EXECUTION_FIELDS


def check_execution_changes(changes: dict[str, Any]) -> dict[str, Any]:
    """Validate update_execution() keywords; add updated_at; coerce status."""
    unknown = set(changes) - EXECUTION_FIELDS
    if unknown:
        raise ConfigError(
            f"update_execution() cannot set {sorted(unknown)}. Accepted: "
            f"{sorted(EXECUTION_FIELDS)} (the fence changes only through claim())."
        )
    out = dict(changes)
    if "status" in out:
        out["status"] = ExecutionStatus(out["status"])
    out.setdefault("updated_at", utcnow())
    return out


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
    """The URL with any password replaced by ***, safe for logs and errors."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    creds, _, host = rest.rpartition("@")
    if ":" in creds:
        user = creds.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return url


def check_page(limit: int, offset: int) -> None:
    if not isinstance(limit, int) or limit < 1:
        raise ConfigError(f"limit must be an int >= 1, got {limit!r}.")
    if not isinstance(offset, int) or offset < 0:
        raise ConfigError(f"offset must be an int >= 0, got {offset!r}.")
