"""Records a store refuses for their content raise RecordRefusedError, not a retryable
StoreError: the writer must never retry them at the head of its queue (issue 17)."""

from __future__ import annotations

from typing import Any

import pytest

from livingai_tasks.errors import RecordRefusedError, StoreError, StoreUnavailableError
from livingai_tasks.nodes import Execution, ExecutionNode, NodeType


def node(execution_id: str, seq: int, **kw: Any) -> ExecutionNode:
    return ExecutionNode(execution_id=execution_id, type=kw.pop("type", NodeType.PROMPT),
                         seq=seq, **kw)


@pytest.mark.parametrize("store_url", ["postgres", "tiered"], indirect=True)
def test_nul_in_text_is_refused_not_retryable(store: Any) -> None:
    with pytest.raises(RecordRefusedError) as caught:
        store.put_execution(Execution(id="e-nul", reason="bad \x00 byte"))
    assert not isinstance(caught.value, StoreUnavailableError)
    store.append([node("e-ok", 1, input={"text": "fine"})])  # the store itself still works
    assert [n.seq for n in store.nodes("e-ok")] == [1]


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
def test_seq_past_bigint_is_refused(store: Any) -> None:
    with pytest.raises(RecordRefusedError):
        store.append([node("e-big", 2**63)])


@pytest.mark.parametrize("store_url", ["postgres", "sqlite"], indirect=True)
def test_unencodable_string_is_refused(store: Any) -> None:
    with pytest.raises(RecordRefusedError):
        store.put_execution(Execution(id="e-sur", reason="half a pair \ud800"))


@pytest.mark.parametrize("store_url", ["redis"], indirect=True)
def test_redis_wrong_type_is_refused(store: Any, redis_prefix: str) -> None:
    import redis

    from tests.conftest import REDIS_URL

    store.append([node("e-wt", 1)])
    client = redis.Redis.from_url(REDIS_URL)
    keys = [k for k in client.scan_iter(f"{redis_prefix}*") if b"e-wt" in k]
    assert keys, "the store wrote no key naming the execution"
    for key in keys:
        client.delete(key)
        client.set(key, b"not the type the store expects")
    with pytest.raises(StoreError) as caught:
        store.append([node("e-wt", 2)])
    assert isinstance(caught.value, RecordRefusedError), caught.value
