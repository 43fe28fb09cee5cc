"""The SQL store's rows: how records map to table rows and back, and the fenced insert."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping

from ..errors import CorruptRecordError
from ..nodes import Execution, ExecutionNode, dumps_json
from .sql_schema import EXECUTIONS, NODE_VERSIONS

__all__ = ["LATEST_KEYS", "node_row", "node_from", "execution_values", "execution_from",
           "build_fenced_insert", "readable_executions"]

log = logging.getLogger(__name__)

LATEST_KEYS = ("node_id", "execution_id", "seq", "created_at")  # copied into lai_node_latest


def node_row(node: ExecutionNode) -> dict[str, Any]:
    return {"node_id": node.id, "execution_id": node.execution_id, "seq": node.seq,
            "status": node.status.value, "created_at": node.created_at, "body": node.to_json(),
            "checkpoint": node.checkpoint}


def node_from(row: RowMapping) -> ExecutionNode:
    blob = row["checkpoint"]
    try:
        return ExecutionNode.from_json(row["body"],
                                       checkpoint=None if blob is None else bytes(blob))
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptRecordError(
            f"Node {row['node_id']} of execution {row['execution_id']} (lai_node_versions row "
            f"node_id={row['node_id']} seq={row['seq']}) cannot be decoded: {exc}") from exc


def execution_values(execution: Execution) -> dict[str, Any]:
    return {"id": execution.id, "status": execution.status.value,
            "current_node_id": execution.current_node_id, "lease_owner": execution.lease_owner,
            "lease_deadline": execution.lease_deadline, "fence": execution.fence,
            "attempts": execution.attempts, "reason": execution.reason,
            "created_at": execution.created_at, "updated_at": execution.updated_at,
            "metadata": dumps_json(execution.metadata, what=f"Execution {execution.id} metadata")}


def execution_from(m: RowMapping) -> Execution:
    try:
        return _execution_from(m)
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptRecordError(f"Execution {m['id']} (lai_executions row id={m['id']}) "
                                 f"cannot be decoded: {exc}") from exc


def readable_executions(rows: Sequence[RowMapping]) -> list[Execution]:
    """Decode a listing's rows; a corrupt row is logged and skipped so one bad record never
    hides the others (the recovery tick, `list` and `stats` all read through here)."""
    out: list[Execution] = []
    for row in rows:
        try:
            out.append(execution_from(row))
        except CorruptRecordError as exc:
            log.error("Skipping a corrupt row in a listing: %s", exc)
    return out


def _execution_from(m: RowMapping) -> Execution:
    return Execution(id=m["id"], status=m["status"], current_node_id=m["current_node_id"],
                     lease_owner=m["lease_owner"], lease_deadline=m["lease_deadline"],
                     fence=m["fence"], attempts=m["attempts"], reason=m["reason"],
                     created_at=m["created_at"], updated_at=m["updated_at"],
                     metadata=json.loads(m["metadata"]))


def build_fenced_insert() -> sa.Insert:
    """Insert one node version unless its execution's fence is above the version's own.

    The fence is read with FOR NO KEY UPDATE (PostgreSQL; SQLite ignores it and holds the
    write lock): a claim committed meanwhile is seen, and a claim that comes later waits for
    this transaction. A missing execution fences nothing (coalesce to the node's fence).
    """
    columns = ["node_id", "execution_id", "seq", "status", "created_at", "body", "checkpoint"]
    fence = sa.bindparam("fence", type_=sa.BigInteger)
    current = (sa.select(EXECUTIONS.c.fence)
               .where(EXECUTIONS.c.id == sa.bindparam("execution_id",
                                                      type_=EXECUTIONS.c.id.type))
               .with_for_update(key_share=True).scalar_subquery())
    values = sa.select(*(sa.bindparam(c, type_=NODE_VERSIONS.c[c].type) for c in columns))
    return NODE_VERSIONS.insert().from_select(
        columns, values.where(sa.func.coalesce(current, fence) <= fence))
