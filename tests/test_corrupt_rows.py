"""A corrupt row is named (execution, node, store key) and never hides the other records.

Real PostgreSQL, Redis and a SQLite file: rows are damaged behind the store's back.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import sqlalchemy as sa

import livingai_tasks as lai
from livingai_tasks import Execution, ExecutionNode, NodeType, Status
from livingai_tasks.errors import CorruptRecordError

from .conftest import POSTGRES_URL, REDIS_URL, pg_url

KINDS = ["postgres", "sqlite", "redis"]


def _open(kind: str, request: Any, tmp_path: Any) -> tuple[Any, str, str]:
    if kind == "postgres":
        where = request.getfixturevalue("pg_schema")
        url = pg_url(where)
    elif kind == "sqlite":
        where = str(tmp_path / "store.db")
        url = f"sqlite:///{where}"
    else:
        where = request.getfixturevalue("redis_prefix")
        url = f"{REDIS_URL}?prefix={where}"
    store = lai.open_store(url)
    store.migrate()
    return store, url, where


def _record(store: Any, eid: str) -> ExecutionNode:
    store.create_execution(Execution(id=eid, lease_deadline=time.time() - 60))
    node = ExecutionNode(id=f"{eid}-n1", execution_id=eid, seq=1, type=NodeType.PROMPT,
                         status=Status.RUNNING, input={"args": [1], "kwargs": {}})
    store.append([node])
    return node


def _sql(kind: str, where: str, statement: str, **params: Any) -> None:
    if kind == "postgres":
        engine = sa.create_engine(POSTGRES_URL)
        statement = statement.replace("lai_", f'"{where}".lai_')
    else:
        engine = sa.create_engine(f"sqlite:///{where}")
    with engine.begin() as conn:
        conn.execute(sa.text(statement), params)
    engine.dispose()


def _redis_keys(prefix: str, part: str, kind: bytes) -> list[bytes]:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        return [k for k in client.scan_iter(match=f"{prefix}:*{part}*") if client.type(k) == kind
                and b":ex-heads:" not in k]  # the heads hash holds only version headers
    finally:
        client.close()


def _corrupt_execution(kind: str, where: str, eid: str) -> str:
    """Truncate the execution's metadata JSON; return the store key the error must name."""
    if kind != "redis":
        _sql(kind, where, "UPDATE lai_executions SET metadata = '{\"a' WHERE id = :i", i=eid)
        return eid
    import redis

    keys = _redis_keys(where, eid, b"hash")
    assert len(keys) == 1, keys
    client = redis.Redis.from_url(REDIS_URL)
    client.hset(keys[0], "metadata", b'{"a')
    client.close()
    return keys[0].decode()


def _corrupt_node(kind: str, where: str, node_id: str) -> None:
    if kind != "redis":
        _sql(kind, where, "UPDATE lai_node_versions SET body = substr(body, 1, 25) "
                          "WHERE node_id = :n", n=node_id)
        return
    import redis

    keys = _redis_keys(where, node_id, b"list")
    assert keys, "no version list found to corrupt"
    client = redis.Redis.from_url(REDIS_URL)
    for key in keys:
        raw = client.lindex(key, -1)
        client.lset(key, -1, raw[: len(raw) // 2])
    client.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_corrupt_execution_row_is_named_and_skipped_by_listings(
        kind: str, request: Any, tmp_path: Any, caplog: pytest.LogCaptureFixture) -> None:
    store, _, where = _open(kind, request, tmp_path)
    try:
        for eid in ("older", "bad", "newer"):
            _record(store, eid)
        key = _corrupt_execution(kind, where, "bad")
        with pytest.raises(CorruptRecordError) as err:
            store.get_execution("bad")
        assert "bad" in str(err.value) and key in str(err.value)
        listed = {e.id for e in store.list_executions()}
        assert listed == {"older", "newer"}
        expired = {e.id for e in store.list_executions(lease_expired_before=time.time())}
        assert expired == {"older", "newer"}
        assert any("bad" in r.getMessage() and "corrupt" in r.getMessage()
                   for r in caplog.records)
    finally:
        store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_corrupt_node_body_names_its_node_and_execution(kind: str, request: Any,
                                                          tmp_path: Any) -> None:
    store, _, where = _open(kind, request, tmp_path)
    try:
        bad, good = _record(store, "bad"), _record(store, "good")
        _corrupt_node(kind, where, bad.id)
        with pytest.raises(CorruptRecordError) as err:
            store.get_node(bad.id)
        assert bad.id in str(err.value) and "bad" in str(err.value)
        assert store.get_node(good.id).id == good.id
        assert {e.id for e in store.list_executions()} == {"bad", "good"}
    finally:
        store.close()


def test_tiered_store_evicts_a_corrupt_redis_copy_and_reads_postgres(
        redis_prefix: str, pg_schema: str) -> None:
    import redis

    from livingai_tasks.stores.tiered import TieredStore

    from .test_tiered_store import tiered_url

    store = TieredStore(tiered_url(redis_prefix, pg_url(pg_schema)))
    store.migrate()
    try:
        node = _record(store, "e1")
        (key,) = _redis_keys(redis_prefix, node.id, b"list")
        client = redis.Redis.from_url(REDIS_URL)
        raw = client.lindex(key, -1)
        flipped = raw[:-3] + bytes([raw[-3] ^ 0x01]) + raw[-2:]  # inside the JSON: still parses
        client.lset(key, -1, flipped)
        assert store.get_node(node.id) == node  # PostgreSQL's good copy
        assert not client.exists(key)  # the bad copy is evicted
        assert store.redis_outages == 0  # a corrupt copy is not an outage
        client.close()
    finally:
        store.close()


def _edit_in_place(kind: str, where: str, eid: str, node_id: str) -> tuple[str, str]:
    """Change an `args` value of the node's body and of the execution's metadata, leaving
    valid JSON of the same shape; return the store keys the errors must name."""
    if kind != "redis":
        _sql(kind, where, "UPDATE lai_node_versions SET body = replace(body, '\"args\":[1]', "
                          "'\"args\":[2]') WHERE node_id = :n", n=node_id)
        _sql(kind, where, "UPDATE lai_executions SET metadata = '{\"args\":[2]}' WHERE id = :i",
             i=eid)
        return f"node_id={node_id}", f"id={eid}"
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    (versions,) = _redis_keys(where, node_id, b"list")
    raw = client.lindex(versions, -1)
    assert b'"args":[1]' in raw
    client.lset(versions, -1, raw.replace(b'"args":[1]', b'"args":[2]'))
    (execution,) = _redis_keys(where, f"ex:{eid}", b"hash")
    client.hset(execution, "metadata", b'{"args":[2]}')
    client.close()
    return versions.decode(), execution.decode()


@pytest.mark.parametrize("kind", KINDS)
def test_a_body_edited_in_place_fails_its_checksum(kind: str, request: Any,
                                                   tmp_path: Any) -> None:
    from livingai_tasks.stores.corrupt import collect_skipped

    store, _, where = _open(kind, request, tmp_path)
    try:
        node = _record(store, "edited")
        store.update_execution("edited", metadata={"args": [1]})
        _record(store, "other")
        node_key, execution_key = _edit_in_place(kind, where, "edited", node.id)
        with pytest.raises(CorruptRecordError, match="checksum|CRC") as err:
            store.get_node(node.id)
        assert (err.value.execution_id, err.value.node_id) == ("edited", node.id)
        assert node_key in str(err.value) and node_key in err.value.key
        with pytest.raises(CorruptRecordError, match="checksum") as err:
            store.get_execution("edited")
        assert err.value.execution_id == "edited" and execution_key in str(err.value)
        with collect_skipped() as skipped:
            assert [e.id for e in store.list_executions()] == ["other"]
        assert [(s.execution_id, s.key) for s in skipped] == [("edited", err.value.key)]
    finally:
        store.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_row_without_a_checksum_reads_unverified(kind: str, request: Any,
                                                   tmp_path: Any) -> None:
    """Rows written before bodies carried checksums are legacy, not corrupt."""
    store, _, where = _open(kind, request, tmp_path)
    try:
        node = _record(store, "legacy")
        if kind == "redis":
            import redis

            client = redis.Redis.from_url(REDIS_URL)
            (key,) = _redis_keys(where, "ex:legacy", b"hash")
            client.hdel(key, "checksum")
            client.hset(key, "reason", b'"edited before checksums"')
            client.close()
        else:
            _sql(kind, where, "UPDATE lai_node_versions SET body_crc = NULL, body = replace("
                              "body, '\"args\":[1]', '\"args\":[2]')")
            _sql(kind, where, "UPDATE lai_executions SET metadata_crc = NULL, "
                              "metadata = :m", m='{"old": 1}')
            assert store.get_node(node.id).input == {"args": [2], "kwargs": {}}
        execution = store.get_execution("legacy")
        assert execution is not None and execution.id == "legacy"
        assert [e.id for e in store.list_executions()] == ["legacy"]
    finally:
        store.close()


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_cli_list_stats_and_show_flag_corrupt_records(kind: str, request: Any,
                                                      tmp_path: Any) -> None:
    """`list` and `stats` keep working and flag a corrupt execution row; `show` on it, or
    on an execution whose node body is corrupt, is one line naming ids and key, exit 1."""
    import json

    from .test_cli import cli

    store, url, where = _open(kind, request, tmp_path)
    try:
        for eid in ("good", "bad-row", "bad-node"):
            _record(store, eid)
        row_key = _corrupt_execution(kind, where, "bad-row")
        if kind != "redis":
            row_key = "lai_executions row id=bad-row"
        _corrupt_node(kind, where, "bad-node-n1")
    finally:
        store.close()

    listed = cli("list", "--store", url)
    assert listed.returncode == 0, listed.stderr
    assert "good" in listed.stdout and "bad-node" in listed.stdout
    assert f"1 corrupt record(s) skipped: bad-row ({row_key}" in listed.stdout
    as_json = cli("list", "--store", url, "--json")
    assert sorted(e["id"] for e in json.loads(as_json.stdout)) == ["bad-node", "good"]
    assert "corrupt record(s) skipped: bad-row" in as_json.stderr

    stats = cli("stats", "--store", url)
    assert stats.returncode == 0, stats.stderr
    assert "corrupt records (unreadable, not counted above): 1" in stats.stdout
    assert "skipped: bad-row" in stats.stdout
    data = json.loads(cli("stats", "--store", url, "--json").stdout)
    assert data["corrupt"] == 1 and data["corrupt_records"] == ["bad-row"]
    assert data["executions"]["RUNNING"] == 2

    for eid, names in (("bad-row", ["bad-row", row_key]),
                       ("bad-node", ["bad-node", "bad-node-n1"])):
        shown = cli("show", eid, "--store", url)
        assert shown.returncode == 1 and shown.stdout == ""
        lines = shown.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in shown.stderr, shown.stderr
        assert "corrupt" in lines[0] and all(n in lines[0] for n in names), lines[0]


def test_corrupt_record_error_pickles_with_its_ids() -> None:
    import pickle

    err = pickle.loads(pickle.dumps(CorruptRecordError(
        "Node n1 of execution e1 is corrupt", execution_id="e1", node_id="n1", key="k")))
    assert (str(err), err.execution_id, err.node_id, err.key) == (
        "Node n1 of execution e1 is corrupt", "e1", "n1", "k")
