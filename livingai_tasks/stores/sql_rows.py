"""The SQL store's rows: how records map to table rows and back, the fenced insert, and
the execution updates."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import RowMapping

from ..errors import CorruptRecordError
from ..nodes import Execution, ExecutionNode, dumps_json
from ._common import check_execution_changes, split_if_fence
from .corrupt import check_text_crc, skip_corrupt, text_crc
from .sql_schema import EXECUTIONS, NODE_LATEST, NODE_VERSIONS

__all__ = ["LATEST_KEYS", "node_row", "node_from", "execution_values", "execution_from",
           "build_fenced_insert", "build_superseding_update", "superseding_params",
           "readable_executions", "metadata_values", "execution_update"]

LATEST_KEYS = ("node_id", "execution_id", "seq", "created_at")  # copied into lai_node_latest


def node_row(node: ExecutionNode) -> dict[str, Any]:
    body = node.to_json()
    return {"node_id": node.id, "execution_id": node.execution_id, "seq": node.seq,
            "status": node.status.value, "created_at": node.created_at, "body": body,
            "checkpoint": node.checkpoint, "body_crc": text_crc(body)}


def node_from(row: Mapping[Any, Any]) -> ExecutionNode:
    """The node a lai_node_versions row holds, its body checked against body_crc (a row
    without one, written before schema version 6, reads unverified). The checkpoint blob
    carries its own CRC, checked where it is decoded (codec.decode)."""
    blob = row["checkpoint"]
    key = f"lai_node_versions row node_id={row['node_id']} seq={row['seq']}"
    try:
        mismatch = check_text_crc(row["body"], row["body_crc"])
        if mismatch:
            raise ValueError(mismatch)
        node = ExecutionNode.from_json(row["body"],
                                       checkpoint=None if blob is None else bytes(blob))
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptRecordError(
            f"Node {row['node_id']} of execution {row['execution_id']} ({key}) is corrupt: "
            f"{exc}", execution_id=str(row["execution_id"]), node_id=str(row["node_id"]),
            key=key) from exc
    if node.id != row["node_id"] or node.execution_id != row["execution_id"]:
        # A body copied onto another row parses and passes its own checksum.
        raise CorruptRecordError(
            f"Node {row['node_id']} of execution {row['execution_id']} ({key}) is corrupt: "
            f"its body is node {node.id} of execution {node.execution_id}",
            execution_id=str(row["execution_id"]), node_id=str(row["node_id"]), key=key)
    return node


def execution_values(execution: Execution) -> dict[str, Any]:
    return {"id": execution.id, "status": execution.status.value,
            "current_node_id": execution.current_node_id, "lease_owner": execution.lease_owner,
            "lease_deadline": execution.lease_deadline, "fence": execution.fence,
            "attempts": execution.attempts, "reason": execution.reason,
            "created_at": execution.created_at, "updated_at": execution.updated_at,
            **metadata_values(execution.metadata, execution.id)}


def metadata_values(metadata: Any, execution_id: str) -> dict[str, Any]:
    """The metadata column and its checksum, always written together."""
    text = dumps_json(metadata, what=f"Execution {execution_id} metadata")
    return {"metadata": text, "metadata_crc": text_crc(text)}


def execution_from(m: RowMapping) -> Execution:
    """The execution a lai_executions row holds, its metadata checked against metadata_crc
    (NULL in rows written before schema version 6: unverified)."""
    key = f"lai_executions row id={m['id']}"
    try:
        mismatch = check_text_crc(m["metadata"], m["metadata_crc"])
        if mismatch:
            raise ValueError(f"metadata {mismatch}")
        return _execution_from(m)
    except (ValueError, TypeError, KeyError) as exc:
        raise CorruptRecordError(f"Execution {m['id']} ({key}) is corrupt: {exc}",
                                 execution_id=str(m["id"]), key=key) from exc


def readable_executions(rows: Sequence[RowMapping], store_url: str) -> list[Execution]:
    """Decode a listing's rows; a corrupt row is skipped (logged once, collected: see
    stores/corrupt.py) so one bad record never hides the others (the recovery tick, `list`
    and `stats` all read through here)."""
    out: list[Execution] = []
    for row in rows:
        try:
            out.append(execution_from(row))
        except CorruptRecordError as exc:
            skip_corrupt(store_url, exc)
    return out


def _execution_from(m: RowMapping) -> Execution:
    return Execution(id=m["id"], status=m["status"], current_node_id=m["current_node_id"],
                     lease_owner=m["lease_owner"], lease_deadline=m["lease_deadline"],
                     fence=m["fence"], attempts=m["attempts"], reason=m["reason"],
                     created_at=m["created_at"], updated_at=m["updated_at"],
                     metadata=json.loads(m["metadata"]))


_COLUMNS = ("node_id", "execution_id", "seq", "status", "created_at", "body", "checkpoint",
            "body_crc")
_REWRITTEN = ("status", "created_at", "body", "checkpoint", "body_crc")


def _fence_allows() -> sa.ColumnElement[bool]:
    """The version's fence (bound as `fence`) is not below its execution's. The execution's
    is read with FOR NO KEY UPDATE (PostgreSQL; SQLite ignores it and holds the write lock):
    a claim committed meanwhile is seen, and a claim that comes later waits for this
    transaction. A missing execution fences nothing (coalesce to the node's fence)."""
    fence = sa.bindparam("fence", type_=sa.BigInteger)
    current = (sa.select(EXECUTIONS.c.fence)
               .where(EXECUTIONS.c.id == sa.bindparam("execution_id",
                                                      type_=EXECUTIONS.c.id.type))
               .with_for_update(key_share=True).scalar_subquery())
    return sa.func.coalesce(current, fence) <= fence


def build_fenced_insert(*, unless_superseding: bool = False) -> sa.Insert:
    """Insert one node version unless its execution's fence is above the version's own.
    `unless_superseding`: nor if build_superseding_update() wrote it over the row
    `replaces` earlier in the transaction (that row now holds its body's CRC)."""
    values = sa.select(*(sa.bindparam(c, type_=NODE_VERSIONS.c[c].type) for c in _COLUMNS))
    values = values.where(_fence_allows())
    if unless_superseding:
        v = NODE_VERSIONS.c
        values = values.where(~sa.exists().where(
            v.id == sa.bindparam("replaces", type_=v.id.type),
            v.body_crc == sa.bindparam("body_crc", type_=v.body_crc.type)))
    # RETURNING: a row back says the version was stored, so the fence's verdict on each
    # version is the insert's own (sql_direct.py), never read back after.
    return NODE_VERSIONS.insert().from_select(_COLUMNS, values).returning(NODE_VERSIONS.c.id)


def build_superseding_update() -> sa.Update:
    """Write a node's version over the row of the version it supersedes
    (ExecutionNode.is_supersedable) if that row, `replaces`, is still the node's latest and
    still holds the body its writer stored (`replaces_crc`), under the same fence as an
    insert: the step's input is then stored once, as when the two land in one batch
    (writer.coalesced). Its row back says it did; if not, the insert that follows it in the
    transaction stores the version. Bind names are prefixed: an UPDATE's may not be a
    column's."""
    v = NODE_VERSIONS.c
    latest = (sa.select(NODE_LATEST.c.version_id)
              .where(NODE_LATEST.c.node_id == sa.bindparam("node_id", type_=v.node_id.type))
              .scalar_subquery())
    return (NODE_VERSIONS.update()
            .where(v.id == sa.bindparam("replaces", type_=v.id.type),
                   v.body_crc == sa.bindparam("replaces_crc", type_=v.body_crc.type),
                   v.id == latest, _fence_allows())
            .values({c: sa.bindparam(f"new_{c}", type_=v[c].type) for c in _REWRITTEN})
            .returning(v.id))


def superseding_params(row: dict[str, Any], replaces: tuple[int, int]) -> dict[str, Any]:
    """build_superseding_update()'s parameters for the insert parameters `row`, over the
    row `replaces` (its id and body CRC)."""
    return {"node_id": row["node_id"], "execution_id": row["execution_id"],
            "fence": row["fence"], "replaces": replaces[0], "replaces_crc": replaces[1],
            **{f"new_{c}": row[c] for c in _REWRITTEN}}


# update_execution()'s statements by (columns set, conditional on the fence); bind names are
# prefixed: a bind parameter may not share a column's name in an UPDATE.
_UPDATES: dict[tuple[tuple[str, ...], bool], sa.Update] = {}


def execution_update(execution_id: str,
                     changes: dict[str, Any]) -> tuple[sa.Update, dict[str, Any]]:
    """The UPDATE for update_execution(execution_id, **changes) and its parameters. One
    statement per set of columns, built once: building it per call (every value a bind
    parameter, then the statement's cache key) cost more CPU than sending it."""
    if_fence = split_if_fence(changes)
    values = check_execution_changes(changes)
    if "status" in values:
        values["status"] = values["status"].value
    if "metadata" in values:
        values.update(metadata_values(values["metadata"], execution_id))
    shape = (tuple(sorted(values)), if_fence is not None)
    stmt = _UPDATES.get(shape)
    if stmt is None:
        stmt = _UPDATES.setdefault(shape, _build_update(*shape))
    params = {f"v_{k}": v for k, v in values.items()}
    params["k_id"], params["k_fence"] = execution_id, if_fence
    return stmt, params


def _build_update(columns: tuple[str, ...], fenced: bool) -> sa.Update:
    stmt = (EXECUTIONS.update().where(EXECUTIONS.c.id == sa.bindparam("k_id"))
            .values({c: sa.bindparam(f"v_{c}", type_=EXECUTIONS.c[c].type) for c in columns}))
    return stmt.where(EXECUTIONS.c.fence <= sa.bindparam("k_fence")) if fenced else stmt
