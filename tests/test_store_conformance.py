"""The Store contract, run against every backend on real servers (see conftest.store_url).

Every test runs on every store kind, except those marked @covers(capability): they run on
the kinds that declare that optional capability (DECLARED), and
test_each_kind_declares_exactly_its_capabilities holds each kind to its entry there.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import pickle
import struct
import time
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

import pytest

from livingai_tasks import (
    ConfigError,
    ErrorInfo,
    Execution,
    ExecutionNode,
    ExecutionStatus,
    NodeType,
    RecordError,
    Status,
    open_store,
)
from livingai_tasks.errors import FencedOutError, StoreError
from livingai_tasks.nodes import Meta, utcnow
from livingai_tasks.stores import (
    AppendsIfNew,
    Fenced,
    KeepsSideRecords,
    ListsWorkers,
    SetsAside,
    Store,
    SweepsHotTier,
    TracksWorkers,
    WorkerRecord,
    WritesBeforeEntry,
    mask_url,
)
from livingai_tasks.stores.tiered import TieredStore, parse_tiered_url

from .conftest import STORE_KINDS, race

# The optional capabilities each kind declares. A new store kind adds its row here.
DECLARED: dict[type, list[str]] = {
    AppendsIfNew: ["memory", "redis"],
    WritesBeforeEntry: ["memory", "redis"],
    SweepsHotTier: ["tiered"],
    TracksWorkers: ["memory", "sqlite", "redis", "postgres", "tiered"],
    ListsWorkers: ["memory", "sqlite", "redis", "postgres", "tiered"],
    SetsAside: ["memory", "sqlite", "redis", "postgres", "tiered"],
    KeepsSideRecords: ["memory", "sqlite", "redis", "postgres", "tiered"],
}

F = TypeVar("F", bound=Callable[..., Any])


def covers(capability: type) -> Callable[[F], F]:
    """Run the test on the store kinds that declare `capability` only."""
    def mark(test: F) -> F:
        test.capability = capability  # type: ignore[attr-defined]
        return test
    return mark


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "store_url" in metafunc.fixturenames:
        capability = getattr(metafunc.function, "capability", None)
        kinds = STORE_KINDS if capability is None else DECLARED[capability]
        metafunc.parametrize("store_url", kinds, indirect=True)


@pytest.fixture
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.node.callspec.params["store_url"])


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


# The kinds whose write() lets a version take the place of the one it supersedes (the
# Store protocol's write(): optional; the memory store appends).
SUPERSEDING = ("sqlite", "redis", "postgres", "tiered")


def _step_started(store, *, idempotent: bool = True) -> ExecutionNode:
    """A step's RUNNING version, written as the engine's writer writes it."""
    store.create_execution(Execution(id="e1"))
    running = node("e1", 1, status=Status.RUNNING, input={"args": [{"big": "x" * 2000}]},
                   metadata={Meta.FENCE: 0, Meta.IDEMPOTENT: idempotent})
    assert not store.write([running], ())
    return running


def test_write_stores_an_idempotent_step_s_input_once(store, kind: str) -> None:
    running = _step_started(store)
    done = running.evolve(status=Status.SUCCESS, output={"ok": 1})
    store.write([done], ())
    assert store.node_versions(running.id) == ([done] if kind in SUPERSEDING else
                                               [running, done])
    assert store.get_node(running.id) == done and store.nodes("e1") == [done]
    again = done.evolve(status=Status.FAILED)  # only a RUNNING version is superseded
    store.write([again], ())
    assert store.node_versions(running.id)[-2:] == [done, again]
    assert store.get_node(running.id) == again


def test_a_version_appended_since_keeps_what_it_follows(store, store_url: str,
                                                        kind: str) -> None:
    if kind == "memory":
        pytest.skip("memory:// is per-process by design")
    running = _step_started(store)
    other = open_store(store_url)  # another process: a worker's main process, say
    try:
        crashed = running.evolve(status=Status.CRASHED)
        other.append([crashed])
    finally:
        other.close()
    done = running.evolve(status=Status.SUCCESS)
    store.write([done], ())
    assert store.node_versions(running.id) == [running, crashed, done]


def test_a_tool_s_start_and_append_keep_every_version(store) -> None:
    running = _step_started(store, idempotent=False)  # the evidence a side effect began
    store.write([running.evolve(status=Status.SUCCESS)], ())
    assert [v.status for v in store.node_versions(running.id)] == [Status.RUNNING,
                                                                    Status.SUCCESS]
    step = node("e1", 2, status=Status.RUNNING, metadata={Meta.IDEMPOTENT: True})
    store.write([step], ())
    store.append([step.evolve(status=Status.SUCCESS)])  # append() never replaces
    assert [v.status for v in store.node_versions(step.id)] == [Status.RUNNING,
                                                                 Status.SUCCESS]


def test_a_fenced_out_outcome_leaves_the_running_version(store) -> None:
    running = _step_started(store)
    assert store.claim("e1", fence=0, owner="recovery", lease_s=30)
    assert store.write([running.evolve(status=Status.SUCCESS)], ()).nodes == (running.id,)
    assert store.node_versions(running.id) == [running]
    assert store.get_node(running.id) == running


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


def test_claim_needs_an_expired_or_free_lease(store) -> None:
    now = time.time()
    store.create_execution(Execution(id="live", lease_deadline=now + 30))
    store.create_execution(Execution(id="expired", lease_deadline=now - 1))
    store.create_execution(Execution(id="in-doubt", status=ExecutionStatus.IN_DOUBT))
    assert store.claim("live", fence=0, owner="w1", lease_s=10) is False
    assert store.get_execution("live").fence == 0  # nothing changed
    assert store.claim("expired", fence=0, owner="w1", lease_s=10) is True
    assert store.claim("in-doubt", fence=0, owner="w1", lease_s=10) is True  # lease NULL
    # `now` is the claimer's clock: the live lease is expired 31 s from now.
    assert store.claim("live", fence=0, owner="w2", lease_s=10, now=now + 31) is True
    got = store.get_execution("live")
    assert (got.fence, got.lease_owner) == (1, "w2")
    assert got.lease_deadline == pytest.approx(now + 41, abs=1e-3)


def test_a_lease_renewed_after_the_listing_makes_the_claim_fail(store) -> None:
    store.create_execution(Execution(id="e1", lease_deadline=time.time() - 1))
    [listed] = store.list_executions(lease_expired_before=time.time())
    store.update_execution("e1", lease_deadline=time.time() + 30)  # its holder renews
    assert store.claim("e1", fence=listed.fence, owner="recovery", lease_s=10) is False
    assert store.get_execution("e1").fence == 0


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


def test_close_is_idempotent_and_a_closed_store_reconnects(store) -> None:
    n = node("e1", 1, checkpoint=b"\x00kept")
    store.append([n])
    store.create_execution(Execution(id="e1"))
    execution = store.get_execution("e1")
    store.close()
    store.close()  # a second close is a no-op, not an error
    # Closing releases connections, not data: the next call reconnects and finds it all.
    assert store.get_node(n.id) == n
    assert store.latest_checkpoint("e1") == n
    assert execution is not None and store.get_execution("e1") == execution
    done = n.evolve(status=Status.SUCCESS, checkpoint=None)
    store.append([done])
    assert store.node_versions(n.id) == [n, done]
    store.close()


# A password with a character that must be URL-encoded: each spelling starts with "kn0wn".
SECRET = "kn0wn-pa@ss"


def _add_password(url: str) -> str:
    parts = urlsplit(url)
    user, _, host = parts.netloc.rpartition("@")
    return urlunsplit(parts._replace(netloc=f"{user}:{quote(SECRET, safe='')}@{host}"))


def _with_password(url: str, kind: str) -> str:
    """The store's URL with SECRET as every password in it (the servers here accept any:
    PostgreSQL trusts local clients, Redis's default user is nopass)."""
    if kind == "tiered":
        redis_url, durable = parse_tiered_url(url)
        return f"tiered+{_add_password(redis_url)}&durable={quote(_add_password(durable), safe='')}"
    return _add_password(url)


def test_no_password_reaches_url_repr_or_logs(
    kind: str, store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    url = _with_password(store_url, kind)
    assert "kn0wn" in url  # in its encoded spelling: the test looks for the right thing
    seen = [mask_url(url)]
    if kind == "sqlite":  # a file has no password: refused, without echoing it
        with pytest.raises(ConfigError, match="credentials") as info:
            open_store(url)
        seen.append(str(info.value))
    else:
        with caplog.at_level(logging.DEBUG):  # every logger, every level
            store = open_store(url)
            seen += [store.url, repr(store), str(store)]
            seen += [repr(v) for v in vars(store).values() if isinstance(v, Store)]  # tiers
            assert "***" in store.url
            try:
                store.migrate()
                n = node("e1", 1, checkpoint=b"\x00state")
                store.append([n])
                store.create_execution(Execution(id="e1"))
                assert store.get_node(n.id) == n and store.latest_checkpoint("e1") == n
            finally:
                store.close()
        seen += [caplog.text, *(r.getMessage() for r in caplog.records)]
    leaks = [text for text in seen if "kn0wn" in text.lower()]
    assert leaks == []


# -- fencing ----------------------------------------------------------------------------


def fenced(execution_id: str, seq: int, fence: int, **kw: object) -> ExecutionNode:
    return node(execution_id, seq, metadata={Meta.FENCE: fence}, **kw)


def test_a_stale_node_is_refused_and_the_rest_of_its_batch_written(store) -> None:
    store.create_execution(Execution(id="e1", fence=2))
    earlier = fenced("e1", 1, 2, status=Status.RUNNING)
    store.append([earlier])
    stale = fenced("e1", 2, 1, status=Status.SUCCESS, checkpoint=b"\x00stale")
    stale_version = earlier.evolve(status=Status.SUCCESS, metadata={})  # fence missing = 0
    current = fenced("e1", 3, 2, checkpoint=b"\x00current")
    other = node("e2", 1)  # another execution, which does not exist: accepted
    got = store.write([stale, current, stale_version, other], [])
    assert got == Fenced(nodes=(stale.id, earlier.id)) and got
    assert store.get_node(stale.id) is None and store.node_versions(stale.id) == []
    assert store.get_node(earlier.id) == earlier  # the stale version never became latest
    assert store.node_versions(earlier.id) == [earlier]
    assert store.get_node(current.id) == current and store.get_node(other.id) == other
    assert [n.id for n in store.nodes("e1")] == [earlier.id, current.id]
    assert store.latest_checkpoint("e1") == current
    # One node, versions under both fences in one batch: the id is listed once, and the
    # accepted version becomes the latest.
    again = earlier.evolve(status=Status.SUCCESS, metadata={Meta.FENCE: 1})
    accepted = earlier.evolve(status=Status.FAILED)
    assert store.append([again, accepted, again]) == Fenced(nodes=(earlier.id,))
    assert store.node_versions(earlier.id) == [earlier, accepted]
    assert store.get_node(earlier.id) == accepted


def test_nodes_under_the_current_or_a_newer_fence_or_of_no_execution_are_accepted(
        store) -> None:
    store.create_execution(Execution(id="e1", fence=1))
    batch = [fenced("e1", 1, 1), fenced("e1", 2, 5), fenced("nowhere", 1, 0), node("e3", 1)]
    got = store.append(batch)
    assert got == Fenced() and not got
    assert [store.get_node(n.id) for n in batch] == batch


def test_if_fence_updates_apply_only_while_the_fence_allows(store) -> None:
    store.create_execution(Execution(id="e1", fence=3))
    store.create_execution(Execution(id="e2", fence=0))
    got = store.write([], [("e1", {"reason": "stale", "if_fence": 2}),
                           ("e1", {"reason": "current", "if_fence": 3}),
                           ("e2", {"reason": "newer", "if_fence": 7}),
                           ("e1", {"current_node_id": "late", "if_fence": 0}),
                           ("missing", {"reason": "x", "if_fence": 0})])
    assert got == Fenced(executions=("e1", "e1"))  # a missing execution is no refusal
    assert (store.get_execution("e1").reason, store.get_execution("e1").current_node_id) == (
        "current", None)
    assert store.get_execution("e2").reason == "newer"
    assert store.update_execution("e1", reason="old", if_fence=2) is False
    assert store.update_execution("e1", reason="mine", if_fence=3) is True
    assert store.update_execution("e1", reason="operator") is True  # no condition: applies
    assert store.update_execution("missing", reason="x", if_fence=9) is False
    assert store.get_execution("e1").reason == "operator"
    for bad in (-1, "3", 1.5, True):
        with pytest.raises(ConfigError, match="if_fence"):
            store.update_execution("e1", if_fence=bad)


@covers(AppendsIfNew)
def test_append_if_new_raises_fenced_out_naming_both_fences(store) -> None:
    store.create_execution(Execution(id="e1", fence=4))
    stale = fenced("e1", 1, 3, status=Status.RUNNING)
    with pytest.raises(FencedOutError) as info:
        store.append_if_new(stale, {"lease_owner": "zombie"})
    err = info.value
    assert (err.node_id, err.execution_id, err.record_fence, err.current_fence) == (
        stale.id, "e1", 3, 4)
    assert all(str(part) in str(err) for part in (stale.id, "e1", 3, 4))
    assert not isinstance(err, StoreError)  # retrying cannot help
    again = pickle.loads(pickle.dumps(err))
    assert (str(again), again.node_id, again.record_fence, again.current_fence) == (
        str(err), stale.id, 3, 4)
    # A current node whose update carries a stale if_fence is refused as well.
    current = fenced("e1", 2, 4, status=Status.RUNNING)
    with pytest.raises(FencedOutError) as info:
        store.append_if_new(current, {"lease_owner": "zombie", "if_fence": 2})
    assert (info.value.record_fence, info.value.current_fence) == (2, 4)
    assert store.get_node(stale.id) is None and store.get_node(current.id) is None
    assert store.get_execution("e1").lease_owner is None
    assert store.append_if_new(current, {"lease_owner": "w4", "if_fence": 4}) is None
    assert store.get_execution("e1").lease_owner == "w4"


def _fenced_appender(url: str, start: Any, results: Any) -> None:
    """For 3 s, append batches of "atomic" records under the fence last read, reading it
    again after each refusal. Batches of many records keep each transaction open long
    enough for claims to land in the middle of some: a check that does not hold the
    execution's fence for the whole write would accept a batch's first records (committed
    after the claim) and refuse its last: a "mixed" batch."""
    s = open_store(url)
    s.get_node("warm-up")
    start.wait(10)
    fence, batches, accepted, refused, mixed = 0, 0, 0, 0, 0
    end = time.monotonic() + 3
    while time.monotonic() < end:
        batch = [ExecutionNode(execution_id="atomic", type=NodeType.PROMPT, seq=i,
                               input={"pad": "x" * 2000}, metadata={Meta.FENCE: fence})
                 for i in range(25)]
        out = s.append(batch)
        batches += 1
        accepted += len(batch) - len(out.nodes)
        refused += len(out.nodes)
        mixed += 0 < len(out.nodes) < len(batch)
        if out:
            fence = s.get_execution("atomic").fence
    results.put(("appender", batches, accepted, refused, mixed))
    s.close()


def _claim_repeatedly(url: str, start: Any, results: Any) -> None:
    """Claim "atomic" again and again (each lease expires at once). After the first
    claim, note the fence-0 records: no other may land after it."""
    s = open_store(url)
    s.get_execution("atomic")
    start.wait(10)
    time.sleep(0.2)  # let the appender get going
    wins, seen_at_first = 0, None
    end = time.monotonic() + 2.5
    while time.monotonic() < end:
        current = s.get_execution("atomic")
        wins += s.claim("atomic", fence=current.fence, owner="recovery", lease_s=0)
        if wins and seen_at_first is None:
            seen_at_first = [n.id for n in s.nodes("atomic")
                             if n.metadata.get(Meta.FENCE) == 0]
        time.sleep(0.005)
    results.put(("claimer", wins, seen_at_first))
    s.close()


def test_the_fence_check_is_atomic_with_a_concurrent_claim(store, store_url: str) -> None:
    if store_url.startswith("memory"):
        pytest.skip("memory:// is per-process by design")
    store.create_execution(Execution(id="atomic"))
    outcomes = {role: rest for role, *rest in race(
        _role, [(store_url, "appender"), (store_url, "claimer")])}
    (batches, accepted, refused, mixed), (wins, seen) = (outcomes["appender"],
                                                        outcomes["claimer"])
    assert wins >= 10 and accepted and refused, (wins, batches, accepted, refused)
    assert mixed == 0, f"{mixed} of {batches} batches were partly written around a claim"
    # Every fence-0 record that landed, landed before the first claim: none after it.
    stored = {n.id for n in store.nodes("atomic") if n.metadata.get(Meta.FENCE) == 0}
    assert stored == set(seen)
    assert len(store.nodes("atomic")) == accepted


def _role(url: str, role: str, start: Any, results: Any) -> None:
    """One racer: the appender, the repeated claimer, the lease's holder renewing it
    (under the fence it holds), or a recovery claimer (any other name)."""
    if role == "appender":
        return _fenced_appender(url, start, results)
    if role == "claimer":
        return _claim_repeatedly(url, start, results)
    s = open_store(url)
    s.get_execution("race")  # connect before the start line: the race is on the write
    start.wait(10)
    if role == "renewer":
        won = s.update_execution("race", lease_deadline=time.time() + 30, if_fence=0)
    else:
        won = s.claim("race", fence=0, owner=role, lease_s=30)
    results.put((role, won))
    s.close()
    return None


def test_a_claim_racing_a_renewal_has_exactly_one_winner(store, store_url: str) -> None:
    if store_url.startswith("memory"):
        pytest.skip("memory:// is per-process by design")
    store.create_execution(Execution(id="race", lease_deadline=time.time() - 1))
    outcomes = race(_role, [(store_url, "renewer")] + [(store_url, f"c{i}") for i in range(6)])
    renewed = [won for role, won in outcomes if role == "renewer"] == [True]
    winners = [role for role, won in outcomes if role != "renewer" and won]
    assert renewed + len(winners) == 1, outcomes  # the holder keeps it, or one claimer wins
    got = store.get_execution("race")
    if renewed:
        assert (got.fence, got.lease_owner) == (0, None) and got.lease_deadline > time.time()
    else:
        assert (got.fence, got.lease_owner, got.attempts) == (1, winners[0], 1)


# -- optional capabilities --------------------------------------------------------------


@covers(TracksWorkers)
def test_worker_liveness_records(store) -> None:
    now = time.time()
    assert store.worker("w1") is None and store.dead_workers(now) == []
    store.beat_worker("w1", expires_at=now - 5, owners=["h:1", "h:2"], holding=["e1", "e2"])
    store.beat_worker("w2", expires_at=now - 9, owners=["h:3"], holding=[])
    store.beat_worker("w3", expires_at=now + 30, owners=["h:4"], holding=["e3"])
    assert store.worker("w1") == WorkerRecord("w1", now - 5, ("h:1", "h:2"), ("e1", "e2"))
    assert [w.worker for w in store.dead_workers(now)] == ["w2", "w1"]  # oldest first
    assert [w.worker for w in store.dead_workers(now, limit=1)] == ["w2"]
    assert store.dead_workers(now - 9) == []  # strictly before
    # A beat replaces the whole record: w1 is alive again and holds only what it says now.
    store.beat_worker("w1", expires_at=now + 30, owners=["h:1"], holding=["e2"])
    assert store.worker("w1") == WorkerRecord("w1", now + 30, ("h:1",), ("e2",))
    assert [w.worker for w in store.dead_workers(now)] == ["w2"]
    store.forget_worker("w2")
    store.forget_worker("w2")  # idempotent
    assert store.worker("w2") is None and store.dead_workers(now) == []
    assert [w.worker for w in store.dead_workers(now + 31)] == ["w1", "w3"]
    with pytest.raises(ConfigError):
        store.dead_workers(now, limit=0)


@covers(ListsWorkers)
def test_worker_records_carry_counters_and_are_listed(store) -> None:
    now = time.time()
    assert store.workers() == []
    store.beat_worker("w2", expires_at=now + 30, owners=["h:2"], holding=[],
                      counters={"checkpoint_saves": 7, "checkpoint_dropped": 1.5})
    store.beat_worker("w1", expires_at=now - 1, owners=["h:1"], holding=["e1"])
    assert store.worker("w2").counters == {"checkpoint_saves": 7.0, "checkpoint_dropped": 1.5}
    assert store.worker("w1").counters == {}  # none given: none kept
    # Every record, live or expired, by name: stats sums them all.
    assert [w.worker for w in store.workers()] == ["w1", "w2"]
    assert [w.worker for w in store.workers(limit=1)] == ["w1"]
    # A beat replaces the counters with the worker's new totals.
    store.beat_worker("w2", expires_at=now + 30, owners=["h:2"], holding=[],
                      counters={"checkpoint_saves": 9})
    assert store.worker("w2").counters == {"checkpoint_saves": 9.0}
    with pytest.raises(ValueError, match="'w3'"):
        store.beat_worker("w3", expires_at=now, owners=[], holding=[],
                          counters={"checkpoint_saves": "many"})
    with pytest.raises(ConfigError):
        store.workers(limit=0)


def test_each_kind_declares_exactly_its_capabilities(store, kind: str) -> None:
    assert isinstance(store, Store)
    declared = {capability for capability, kinds in DECLARED.items() if kind in kinds}
    assert {c for c in DECLARED if isinstance(store, c)} == declared


@covers(SetsAside)
def test_set_aside_keeps_records_opaquely_newest_first(store) -> None:
    assert store.rejected() == []
    store.set_aside("append", "e-1", "n-1", b'{"node": {"text": "a\\u0000b"}}',
                    "refused the record: invalid byte sequence")
    store.set_aside("update", "e-\x00two", None, b"\xff\x00 not even JSON", "x" * 10_000)
    newest, oldest = store.rejected()
    assert (newest.kind, newest.execution_id, newest.node_id) == ("update", "e-\\u0000two",
                                                                  None)
    assert newest.payload == b"\xff\x00 not even JSON" and len(newest.reason) < 10_000
    assert (oldest.kind, oldest.execution_id, oldest.node_id) == ("append", "e-1", "n-1")
    assert oldest.payload == b'{"node": {"text": "a\\u0000b"}}'
    assert oldest.reason == "refused the record: invalid byte sequence"
    assert oldest.rejected_at <= newest.rejected_at <= time.time()
    assert [r.kind for r in store.rejected(limit=1)] == ["update"]
    with pytest.raises(ConfigError):
        store.rejected(limit=0)


@covers(AppendsIfNew)
def test_append_if_new_writes_a_first_version_with_its_execution_changes(store) -> None:
    store.create_execution(Execution(id="e1"))
    deadline = time.time() + 30
    first = node("e1", 1, status=Status.RUNNING, input={"args": [1]})
    lease = {"current_node_id": first.id, "lease_owner": "w1", "lease_deadline": deadline}
    assert store.append_if_new(first, lease) is None
    assert store.node_versions(first.id) == [first]
    assert store.nodes("e1") == [first]
    got = store.get_execution("e1")
    assert (got.current_node_id, got.lease_owner) == (first.id, "w1")
    assert got.lease_deadline == pytest.approx(deadline, abs=1e-3)
    assert [e.id for e in store.list_executions(lease_expired_before=deadline + 1)] == ["e1"]


@covers(AppendsIfNew)
def test_append_if_new_on_a_stored_node_returns_its_latest_version_and_writes_nothing(
        store) -> None:
    store.create_execution(Execution(id="e1"))
    first = node("e1", 1, status=Status.RUNNING)
    done = first.evolve(status=Status.SUCCESS, output={"ok": 1})
    store.append([first, done])
    before = store.get_execution("e1")
    # A second delivery of the step: the store answers with what it has.
    again = first.evolve(metadata={"attempt": 2})
    lease = {"lease_owner": "w2", "lease_deadline": time.time() + 30}
    assert store.append_if_new(again, lease) == done
    assert store.node_versions(first.id) == [first, done]
    assert store.get_execution("e1") == before


@covers(AppendsIfNew)
def test_append_if_new_without_changes_writes_the_node_alone(store) -> None:
    n = node("e1", 1, status=Status.RUNNING)
    assert store.append_if_new(n, {}) is None
    assert store.node_versions(n.id) == [n]
    assert store.get_execution("e1") is None


@covers(AppendsIfNew)
def test_append_if_new_refuses_a_checkpoint_or_a_bad_change_and_writes_nothing(store) -> None:
    store.create_execution(Execution(id="e1"))
    with pytest.raises(RecordError, match="without a checkpoint"):
        store.append_if_new(node("e1", 1, id="with-blob", checkpoint=b"\x00s"), {})
    with pytest.raises(ConfigError, match="fence"):
        store.append_if_new(node("e1", 2, id="bad-change"), {"fence": 9})
    assert store.get_node("with-blob") is None and store.get_node("bad-change") is None
    assert store.latest_checkpoint("e1") is None and store.get_execution("e1").fence == 0


@covers(WritesBeforeEntry)
def test_write_then_append_if_new_lands_the_batch_before_the_entry(store) -> None:
    """A write batch (a step's held outcome, a lease) and the next step's entry in one call:
    both land; an entry that finds its node answers with it, and the batch still lands; a
    fenced-out entry raises, saying what the batch's own fence refused (it landed)."""
    for eid in ("e1", "e2"):
        store.create_execution(Execution(id=eid))
    first = node("e1", 1, status=Status.RUNNING, input={"args": [1]},
                 metadata={"idempotent": True})
    assert store.append_if_new(first, {}) is None
    done = first.evolve(status=Status.SUCCESS, output={"ok": 1})
    second = node("e2", 1, status=Status.RUNNING)
    fenced, existing = store.write_then_append_if_new(
        [done], [("e1", {"lease_owner": "w1"})], second, {"lease_owner": "w2"})
    assert not fenced and existing is None
    assert store.get_node(first.id) == done and store.get_node(second.id) == second
    assert store.get_execution("e1").lease_owner == "w1"
    assert store.get_execution("e2").lease_owner == "w2"
    third = node("e1", 2, status=Status.RUNNING)
    again = second.evolve(metadata={"attempt": 2})
    fenced, existing = store.write_then_append_if_new([third], (), again, {})
    assert existing == second and store.get_node(third.id) == third
    assert store.claim("e2", fence=0, owner="recovery", lease_s=0.0)
    fourth = node("e1", 3, status=Status.RUNNING)
    stale = node("e2", 2, status=Status.RUNNING)
    with pytest.raises(FencedOutError) as refused:
        store.write_then_append_if_new([fourth], (), stale, {})
    assert refused.value.written == Fenced()  # type: ignore[attr-defined]
    assert store.get_node(fourth.id) == fourth and store.get_node(stale.id) is None


def _first_writer(url: str, owner: str, start: Any, results: Any) -> None:
    s = open_store(url)
    s.get_node("warm-up")  # connect before the start line: the race is on the write
    start.wait(10)
    mine = ExecutionNode(id="raced", execution_id="race", type=NodeType.TOOL,
                         status=Status.RUNNING, metadata={"owner": owner})
    results.put((owner, s.append_if_new(mine, {"lease_owner": owner}) is None))
    s.close()


@covers(AppendsIfNew)
def test_append_if_new_lets_exactly_one_of_n_processes_write(store, store_url: str) -> None:
    if store_url.startswith("memory"):
        pytest.skip("memory:// is per-process by design")
    store.create_execution(Execution(id="race"))
    outcomes = race(_first_writer, [(store_url, f"w{i}") for i in range(8)])
    winners = [owner for owner, wrote in outcomes if wrote]
    assert len(winners) == 1, outcomes
    assert [v.metadata["owner"] for v in store.node_versions("raced")] == winners
    assert store.get_execution("race").lease_owner == winners[0]


# Making a cached copy stale is the tiered store's own business, so these helpers know it;
# a new kind that declares SweepsHotTier adds its own way here.


def _cut_off(url: str, *, redis: bool = False, postgres: bool = False) -> TieredStore:
    """A store object on the same prefix and schema whose Redis or PostgreSQL is unreachable."""
    redis_url, durable = parse_tiered_url(url)
    if redis:
        redis_url = urlunsplit(urlsplit(redis_url)._replace(netloc="127.0.0.1:1"))
    if postgres:
        parts = urlsplit(durable)
        user = f"{parts.username}@" if parts.username else ""
        durable = urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:1"))
        durable += "&connect_timeout=1"
    return TieredStore(f"tiered+{redis_url}&durable={quote(durable, safe='')}")


def _miss_a_write(url: str, newer: ExecutionNode) -> TieredStore:
    """Write `newer` from a store object cut off Redis (a process alone in a partition):
    PostgreSQL gets it, Redis keeps the copies from before, their keys are recorded."""
    other = _cut_off(url, redis=True)
    other.append([newer])
    assert other.redis_outages == 1
    return other


@covers(SweepsHotTier)
def test_sweep_deletes_the_copies_recorded_as_stale_and_says_how_many(
        store, store_url: str) -> None:
    old = node("e1", 1, status=Status.RUNNING, checkpoint=b"\x00old")
    bystander = node("e2", 1, checkpoint=b"\x00other")
    store.append([old, bystander])
    assert store.sweep_hot_tier() == 0  # nothing recorded
    newer = old.evolve(status=Status.SUCCESS, checkpoint=b"\x00new")
    other = _miss_a_write(store_url, newer)
    try:
        assert store.hot.get_node(old.id) == old  # Redis still holds the old copies
        assert store.hot.latest_checkpoint("e1") == old
        # One record per stale key: the node's versions and its execution's checkpoint.
        assert store.sweep_hot_tier() == 2
        assert store.hot.get_node(old.id) is None and store.hot.latest_checkpoint("e1") is None
        assert store.hot.get_node(bystander.id) == bystander  # not recorded: kept
        assert store.hot.latest_checkpoint("e2") == bystander
        assert store.get_node(old.id) == newer and store.latest_checkpoint("e1") == newer
        assert store.sweep_hot_tier() == 0  # the records went with the keys
    finally:
        other.close()


@covers(SweepsHotTier)
def test_sweep_with_a_tier_unreachable_returns_0_keeps_the_records_and_never_raises(
        store, store_url: str) -> None:
    old = node("e1", 1, status=Status.RUNNING)
    store.append([old])
    other = _miss_a_write(store_url, old.evolve(status=Status.SUCCESS))
    no_redis, no_postgres = _cut_off(store_url, redis=True), _cut_off(store_url, postgres=True)
    try:
        assert no_redis.sweep_hot_tier() == 0
        assert no_postgres.sweep_hot_tier() == 0
        assert store.hot.get_node(old.id) == old  # still there, and still recorded:
        assert store.sweep_hot_tier() == 1
        assert store.hot.get_node(old.id) is None
    finally:
        for s in (other, no_redis, no_postgres):
            s.close()


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


# -- corruption: damage the stored bytes behind the store's back -------------------------
# Each kind's copy is edited through its own connection (a SQL row, a Redis value); the
# tiered store's PostgreSQL copy is damaged and its Redis copy dropped, so the read goes to
# the damaged one. The memory store keeps objects, not bytes: nothing to damage there.

_PACKED_HEADER = struct.Struct(">BBII")  # redis_layout's version header: format 2


def _mutate(data: bytes, how: str) -> bytes:
    if how == "truncate":
        return data[: len(data) // 2]
    if how == "kind":  # livingai 0.4.x's "none" kind byte, which carries no check
        return b"\x00" + data[1:]
    at = data.find(b'"args":[1') + len(b'"args":[')  # a byte inside the JSON: still parses
    at = at if at >= len(b'"args":[') else len(data) // 2 + 2
    return data[:at] + bytes([data[at] ^ 0x02]) + data[at + 1:]


def _damage(store: Any, kind: str, target: ExecutionNode, part: str, how: str) -> None:
    if kind == "redis":
        client = store._connection().client
        for key in (store.keys.versions(target.id), store.keys.checkpoint(target.execution_id)):
            packed = client.lrange(key, 0, -1) if client.type(key) == b"list" else \
                [v for v in [client.get(key)] if v is not None]
            for i, raw in enumerate(packed):
                end = _PACKED_HEADER.size + _PACKED_HEADER.unpack_from(raw)[2]
                damaged = (raw[:_PACKED_HEADER.size] + _mutate(raw[_PACKED_HEADER.size:end], how)
                           + raw[end:]) if part == "body" else raw[:end] + _mutate(raw[end:], how)
                if client.type(key) == b"list":
                    client.lset(key, i, damaged)
                else:
                    client.set(key, damaged)
        return
    import sqlalchemy as sa

    sql = store.durable if kind == "tiered" else store
    with sql._transaction(write=True) as conn:
        rows = conn.execute(sa.text("SELECT id, body, checkpoint FROM lai_node_versions "
                                    "WHERE node_id = :n"), {"n": target.id}).all()
        for row_id, body, blob in rows:
            if part == "body":
                conn.execute(sa.text("UPDATE lai_node_versions SET body = :b WHERE id = :i"),
                             {"b": _mutate(body.encode(), how).decode(errors="replace"),
                              "i": row_id})
            else:
                conn.execute(sa.text("UPDATE lai_node_versions SET checkpoint = :c "
                                     "WHERE id = :i"), {"c": _mutate(bytes(blob), how),
                                                        "i": row_id})
    if kind == "tiered":
        store.hot.evict(nodes=[target.id], checkpoints=[target.execution_id])


def _two_recorded(store: Any) -> tuple[ExecutionNode, ExecutionNode]:
    from livingai_tasks.codec import encode

    pair = []
    for eid in ("e-bad", "e-good"):
        store.create_execution(Execution(id=eid))
        pair.append(node(eid, 1, input={"args": [1], "kwargs": {}},
                         checkpoint=encode(f"{eid} state".encode())))
    store.append(pair)
    return pair[0], pair[1]


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_a_damaged_node_body_is_reported_with_its_ids_and_contained(
        store, kind: str, how: str) -> None:
    if kind == "memory":
        pytest.skip("the memory store keeps objects: no stored bytes to damage")
    from livingai_tasks.errors import CorruptRecordError

    bad, good = _two_recorded(store)
    _damage(store, kind, bad, "body", how)
    for read in (lambda: store.get_node(bad.id), lambda: store.nodes("e-bad"),
                 lambda: store.node_versions(bad.id)):
        with pytest.raises(CorruptRecordError) as err:
            read()
        assert (err.value.execution_id, err.value.node_id) == ("e-bad", bad.id)
        assert bad.id in str(err.value) and "e-bad" in str(err.value) and err.value.key
    assert store.get_node(good.id) == good and store.nodes("e-good") == [good]
    assert {e.id for e in store.list_executions()} == {"e-bad", "e-good"}


@pytest.mark.parametrize("how", ["truncate", "flip", "kind"])
def test_a_damaged_checkpoint_blob_is_detected_never_decoded(store, kind: str,
                                                             how: str) -> None:
    """Redis verifies the whole stored version (its CRC covers the blob); the SQL stores
    hand the blob out and codec.decode() checks it (its CRC covers the kind byte too)."""
    if kind == "memory":
        pytest.skip("the memory store keeps objects: no stored bytes to damage")
    from livingai_tasks.codec import decode
    from livingai_tasks.errors import CodecError, CorruptRecordError

    bad, good = _two_recorded(store)
    _damage(store, kind, bad, "blob", how)
    try:
        got = store.latest_checkpoint("e-bad")
    except CorruptRecordError as exc:
        assert (exc.execution_id, exc.node_id) == ("e-bad", bad.id)
    else:
        assert got is not None and got.checkpoint is not None
        with pytest.raises(CodecError, match=bad.id):
            decode(got.checkpoint, node_id=got.id)
    latest = store.latest_checkpoint("e-good")
    assert latest is not None and decode(latest.checkpoint) == b"e-good state"


@covers(KeepsSideRecords)
def test_side_records_keep_groups_apart_and_insert_if_absent_on_request(store) -> None:
    # keys and groups with the characters LangGraph's ids and namespaces use
    group, other = "thread|a:1", "thread b"
    assert store.side_get("sp", group) == {} and store.side_groups("sp") == []
    store.side_put("sp", group, {'["c","",1]': b"\x00one", "k2": b"two"})
    store.side_put("sp", other, {"k": b"x"})
    store.side_put("other-space", group, {"k": b"y"})
    store.side_put("sp", group, {"k2": b"kept", "k3": b"new"}, replace=False)
    assert store.side_get("sp", group) == {'["c","",1]': b"\x00one", "k2": b"two",
                                           "k3": b"new"}
    store.side_put("sp", group, {"k2": b"replaced"})
    assert store.side_get("sp", group)["k2"] == b"replaced"
    assert store.side_groups("sp") == sorted([group, other])
    store.side_delete("sp", group, ["k2", "missing"])
    assert set(store.side_get("sp", group)) == {'["c","",1]', "k3"}
    store.side_delete("sp", group, ['["c","",1]', "k3"])  # emptied: no longer a group
    assert store.side_groups("sp") == [other]
    store.side_delete("sp", other)
    store.side_delete("sp", "never-was")
    assert store.side_groups("sp") == [] and store.side_get("other-space", group) == {"k": b"y"}
