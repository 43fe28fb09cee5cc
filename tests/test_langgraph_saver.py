"""LivingAISaver (the LangGraph checkpointer over our stores) against LangGraph's own
conformance suite (langgraph-checkpoint-conformance), on every store kind: real SQLite,
PostgreSQL, Redis and tiered servers, plus memory; every capability, base and extended."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

pytest.importorskip("langgraph.checkpoint.conformance")

from langgraph.checkpoint.conformance import checkpointer_test, validate  # noqa: E402
from langgraph.checkpoint.conformance.capabilities import ALL_CAPABILITIES  # noqa: E402

from livingai_tasks.adapters.langgraph import LivingAISaver, safe_serializer  # noqa: E402

KINDS = ["memory", "sqlite", "postgres", "redis", "tiered"]


@pytest.mark.parametrize("store_url", KINDS, indirect=True)
def test_conformance_suite_passes_every_capability(store: Any) -> None:
    @checkpointer_test(name=f"LivingAISaver[{store.url}]")
    async def factory() -> AsyncIterator[LivingAISaver]:
        yield LivingAISaver(store)

    report = asyncio.run(validate(factory))
    failures = {cap: result.failures for cap, result in report.results.items()
                if not result.passed}
    assert not failures, failures
    assert {cap for cap, r in report.results.items() if r.detected} == \
        {c.value for c in ALL_CAPABILITIES}
    assert sum(r.tests_passed for r in report.results.values()) > 50


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_sync_methods_round_trip(store: Any) -> None:
    """The suite drives the async methods; the graph's sync path uses these."""
    from langgraph.checkpoint.base import empty_checkpoint

    saver = LivingAISaver(store)
    config = {"configurable": {"thread_id": "t1", "checkpoint_ns": ""}}
    cp = empty_checkpoint()
    cp["channel_values"] = {"x": 1}
    stored = saver.put(config, cp, {"source": "input", "step": -1, "run_id": "r"}, {})
    saver.put_writes(stored, [("x", 2)], "task-1")
    saver.put_writes(stored, [("x", 3)], "task-1")  # a re-run never replaces a write
    got = saver.get_tuple({"configurable": {"thread_id": "t1"}})
    assert got is not None and got.checkpoint["channel_values"] == {"x": 1}
    assert got.pending_writes == [("task-1", "x", 2)]
    assert [t.config for t in saver.list(None)] == [stored]
    saver.delete_thread("t1")
    assert saver.get_tuple(config) is None


def test_serializer_never_unpickles() -> None:
    import pickle

    serde = safe_serializer()
    assert serde.pickle_fallback is False
    with pytest.raises(NotImplementedError):
        serde.loads_typed(("pickle", pickle.dumps({"a": 1})))


def test_a_store_without_side_records_is_refused_with_what_is_needed() -> None:
    from livingai_tasks.errors import ConfigError

    with pytest.raises(ConfigError, match="side records"):
        LivingAISaver(object())
