"""The Store contract, run against every backend on real servers (see conftest.store_url)."""

from __future__ import annotations

import multiprocessing as mp
import time
from datetime import timedelta

import pytest

from livingai_tasks import (
    ConfigError,
    ErrorInfo,
    Execution,
    ExecutionNode,
    ExecutionStatus,
    NodeType,
    Status,
    open_store,
)
from livingai_tasks.nodes import utcnow

from .conftest import STORE_KINDS, race

pytestmark = pytest.mark.parametrize("store_url", STORE_KINDS, indirect=True)

SHARED = [k for k in STORE_KINDS if k != "memory"]  # stores other processes can see


def node(execution_id: str, seq: int, **kw: object) -> ExecutionNode:
    return ExecutionNode(execution_id=execution_id, type=kw.pop("type", NodeType.PROMPT),
                         seq=seq, **kw)  # type: ignore[arg-type]


def test_append_keeps_every_version_and_serves_the_latest(store) -> None:
    n1 = node("e1", 1, status=Status.RUNNING, input={"goal": "fly"})
    n2 = n1.evolve(status=Status.SUCCESS, output={"ok": True, "list": [1, 2.5, None]},
                   completed_at=utcnow(), latency_ms=12, cost_tokens=345)
    store.append([n1])
    store.append([n2])
    got = store.get_node(n1.id)
    assert got == n2
    assert [v.status for v in store.node_versions(n1.id)] == [Status.RUNNING, Status.SUCCESS]
    assert store.get_node("missing") is None
    assert store.node_versions("missing") == []


def test_record_round_trips_exactly(store) -> None:
    n = node("e1", 3, type=NodeType.TOOL, status=Status.FAILED, parent_id="p",
             input={"args": ["x"], "kwargs": {"k": "v"}}, output=None,
             error=ErrorInfo("ValueError", "bad card", "Traceback ...\n"),
             metadata={"idempotent": False, "task": "charge", "nested": {"a": [1, "b"]}},
             completed_at=utcnow() + timedelta(seconds=1), checkpoint=b"\x02\x00binary\xff")
    store.append([n])
    assert store.get_node(n.id) == n
    assert store.nodes("e1") == [n]


def test_later_in_a_batch_wins(store) -> None:
    a = node("e1", 1, status=Status.RUNNING)
    store.append([a, a.evolve(status=Status.SUCCESS), a.evolve(status=Status.FAILED)])
    assert store.get_node(a.id).status is Status.FAILED
    assert len(store.node_versions(a.id)) == 3


def test_nodes_are_latest_versions_in_seq_order(store) -> None:
    later = node("e1", 2, status=Status.RUNNING)
    first = node("e1", 1, status=Status.RUNNING)
    other = node("e2", 0)
    store.append([later, first, other])
    store.append([first.evolve(status=Status.SUCCESS)])
    got = store.nodes("e1")
    assert [(n.id, n.status) for n in got] == [(first.id, Status.SUCCESS),
                                               (later.id, Status.RUNNING)]
    assert store.nodes("nope") == []


def test_latest_checkpoint_is_the_furthest_steps_newest_blob(store) -> None:
    a = node("e1", 1, checkpoint=b"\x00one")
    b = node("e1", 2, checkpoint=b"\x00two")
    store.append([a])
    store.append([b, b.evolve(status=Status.SUCCESS, checkpoint=None)])
    got = store.latest_checkpoint("e1")
    assert got is not None and got.id == b.id and got.checkpoint == b"\x00two"
    # Step 1's write landing late (re-sent after an outage, or from a slow worker's queue)
    # must not make its state the latest again: it is stored, but step 2 stays the newest.
    late = a.evolve(status=Status.RUNNING, checkpoint=b"\x00late")
    store.append([late])
    assert store.latest_checkpoint("e1").checkpoint == b"\x00two"
    assert store.node_versions(a.id)[-1] == late
    # A newer version of the same step wins, and so does a further step, in one batch too.
    store.append([b.evolve(checkpoint=b"\x00two-later")])
    assert store.latest_checkpoint("e1").checkpoint == b"\x00two-later"
    c = node("e1", 3, checkpoint=b"\x00three")
    store.append([c, a.evolve(checkpoint=b"\x00late-again")])
    assert store.latest_checkpoint("e1").checkpoint == b"\x00three"
    assert store.latest_checkpoint("e2") is None


def test_large_blob_round_trips(store) -> None:
    blob = bytes(range(256)) * 4096  # 1 MiB, every byte value
    n = node("e1", 1, checkpoint=b"\x00" + blob)
    store.append([n])
    assert store.latest_checkpoint("e1").checkpoint == b"\x00" + blob


def test_execution_create_get_update(store) -> None:
    ex = Execution(id="e1", metadata={"root": "t1"})
    assert store.create_execution(ex) is True
    assert store.create_execution(ex.evolve(metadata={"other": 1})) is False
    assert store.get_execution("e1") == ex
    store.update_execution("e1", status=ExecutionStatus.IN_DOUBT, reason="charge unknown",
                           current_node_id="n3", lease_deadline=123.5, lease_owner="w1")
    got = store.get_execution("e1")
    assert got.status is ExecutionStatus.IN_DOUBT and got.reason == "charge unknown"
    assert (got.current_node_id, got.lease_deadline, got.lease_owner) == ("n3", 123.5, "w1")
    assert got.updated_at >= ex.updated_at and got.metadata == {"root": "t1"}
    store.update_execution("e1", lease_deadline=None)
    assert store.get_execution("e1").lease_deadline is None
    store.update_execution("missing", status=ExecutionStatus.FAILED)  # no-op
    assert store.get_execution("missing") is None


def test_update_execution_rejects_unknown_fields(store) -> None:
    store.create_execution(Execution(id="e1"))
    with pytest.raises(ConfigError, match="fence"):
        store.update_execution("e1", fence=9)
    with pytest.raises(ValueError, match="colour"):
        store.update_execution("e1", colour="red")


def test_write_lands_nodes_and_execution_changes_together(store) -> None:
    store.create_execution(Execution(id="e1"))
    deadline = time.time() + 30
    store.write([node("e1", 1, id="e1-n1", status=Status.RUNNING)],
                [("e1", {"current_node_id": "e1-n1", "lease_owner": "w1",
                         "lease_deadline": deadline}),
                 ("e1", {"lease_owner": "w2"})])  # later in the list wins
    got = store.get_execution("e1")
    assert (got.current_node_id, got.lease_owner) == ("e1-n1", "w2")
    assert got.lease_deadline == pytest.approx(deadline, abs=1e-3)
    assert store.get_node("e1-n1").status is Status.RUNNING
    assert [e.id for e in store.list_executions(lease_expired_before=deadline + 1)] == ["e1"]
    # A bad change is refused before anything is written: no node version either.
    with pytest.raises(ValueError, match="colour"):
        store.write([node("e1", 2, id="e1-n2")], [("e1", {"colour": "red"})])
    assert store.get_node("e1-n2") is None
    store.write([], [("e1", {"status": ExecutionStatus.COMPLETED, "lease_deadline": None})])
    assert store.get_execution("e1").status is ExecutionStatus.COMPLETED
    assert store.list_executions(lease_expired_before=deadline + 1) == []


def test_put_execution_replaces(store) -> None:
    store.put_execution(Execution(id="e1", fence=4))
    store.put_execution(Execution(id="e1", fence=7, status=ExecutionStatus.COMPLETED))
    got = store.get_execution("e1")
    assert (got.fence, got.status) == (7, ExecutionStatus.COMPLETED)


def test_list_executions_filters_and_pages(store) -> None:
    base = utcnow()
    for i in range(7):
        status = ExecutionStatus.COMPLETED if i % 2 else ExecutionStatus.RUNNING
        store.create_execution(Execution(id=f"e{i}", status=status,
                                         created_at=base + timedelta(seconds=i)))
    assert [e.id for e in store.list_executions(limit=3)] == ["e6", "e5", "e4"]
    assert [e.id for e in store.list_executions(limit=3, offset=3)] == ["e3", "e2", "e1"]
    running = store.list_executions(status=ExecutionStatus.RUNNING)
    assert [e.id for e in running] == ["e6", "e4", "e2", "e0"]
    with pytest.raises(ConfigError):
        store.list_executions(limit=0)


def test_lease_index_finds_expired_oldest_first(store) -> None:
    now = time.time()
    deadlines = {"a": now - 5, "b": now - 50, "c": now + 60, "d": None, "e": now - 1}
    for eid, deadline in deadlines.items():
        store.create_execution(Execution(id=eid, lease_deadline=deadline))
    expired = store.list_executions(lease_expired_before=now)
    assert [e.id for e in expired] == ["b", "a", "e"]
    assert [e.id for e in store.list_executions(lease_expired_before=now, limit=1)] == ["b"]
    store.update_execution("b", lease_deadline=now + 100)  # renewed: leaves the expired set
    store.update_execution("e", status=ExecutionStatus.COMPLETED, lease_deadline=None)
    assert [e.id for e in store.list_executions(lease_expired_before=now)] == ["a"]
    done = store.list_executions(status=ExecutionStatus.RUNNING, lease_expired_before=now)
    assert [e.id for e in done] == ["a"]


def test_claim_is_compare_and_set(store) -> None:
    store.create_execution(Execution(id="e1", fence=2, attempts=1))
    assert store.claim("e1", fence=1, owner="w1", lease_s=10) is False
    before = time.time()
    assert store.claim("e1", fence=2, owner="w1", lease_s=10) is True
    got = store.get_execution("e1")
    assert (got.fence, got.lease_owner, got.attempts) == (3, "w1", 2)
    assert before + 9 <= got.lease_deadline <= time.time() + 10.5
    assert store.claim("e1", fence=2, owner="w2", lease_s=10) is False
    assert store.get_execution("e1").lease_owner == "w1"
    assert store.claim("missing", fence=0, owner="w1", lease_s=10) is False


def test_close_is_idempotent(store) -> None:
    store.close()
    store.close()


def test_url_is_safe_to_log(store) -> None:
    assert "password" not in store.url.lower() or "***" in store.url


# -- across processes -----------------------------------------------------------------


def _writer(url: str, worker: int, count: int, start) -> None:  # type: ignore[no-untyped-def]
    s = open_store(url)
    start.wait(10)
    for i in range(count):
        n = ExecutionNode(execution_id="shared", type=NodeType.TOOL, id=f"w{worker}-{i}",
                          seq=i, status=Status.RUNNING, checkpoint=b"\x00%d" % i)
        s.append([n])
        s.append([n.evolve(status=Status.SUCCESS, output={"w": worker, "i": i})])
        s.update_execution("shared", current_node_id=n.id)
    s.close()


def _claimer(url: str, owner: str, start, results) -> None:  # type: ignore[no-untyped-def]
    s = open_store(url)
    s.get_execution("race")  # connect before the start line, so the race is on the claim
    start.wait(10)
    results.put((owner, s.claim("race", fence=0, owner=owner, lease_s=30)))
    s.close()


def _run_all(procs: list) -> None:  # type: ignore[type-arg]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0, f"{p.name} exited with {p.exitcode}"


def test_concurrent_writers_from_several_processes(store, store_url: str) -> None:
    if store_url.startswith("memory"):
        pytest.skip("memory:// is per-process by design")
    store.create_execution(Execution(id="shared"))
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(store_url, w, 25, start)) for w in range(4)]
    for p in procs:
        p.start()
    time.sleep(0.5)
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    got = store.nodes("shared")
    assert len(got) == 100
    assert all(n.status is Status.SUCCESS for n in got)
    assert all(len(store.node_versions(n.id)) == 2 for n in got)
    assert [n.seq for n in got] == sorted(n.seq for n in got)


def test_exactly_one_of_n_processes_wins_a_claim(store, store_url: str) -> None:
    if store_url.startswith("memory"):
        pytest.skip("memory:// is per-process by design")
    store.create_execution(Execution(id="race", fence=0))
    outcomes = race(_claimer, [(store_url, f"c{i}") for i in range(8)])
    winners = [owner for owner, won in outcomes if won]
    assert len(winners) == 1, outcomes
    got = store.get_execution("race")
    assert (got.fence, got.lease_owner, got.attempts) == (1, winners[0], 1)


def test_data_survives_a_fresh_store_object(store, store_url: str) -> None:
    if store_url.startswith("memory"):
        pytest.skip("memory:// is per-process by design")
    n = node("e1", 1, checkpoint=b"\x00state")
    store.append([n])
    store.create_execution(Execution(id="e1"))
    fresh = open_store(store_url)
    try:
        assert fresh.get_node(n.id) == n
        assert fresh.latest_checkpoint("e1") == n
        assert fresh.get_execution("e1") is not None
    finally:
        fresh.close()
