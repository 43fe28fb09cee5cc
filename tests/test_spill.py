"""The write-behind queue under faults, on real stores (SQLite file, PostgreSQL, Redis):
a writer thread killed by a BaseException, a store cut off (a real TCP cut) for longer than
the queue can hold, an engine closed during the outage and another draining what it spilled,
and the priority lane getting a lease renewal through while a data write is stuck.

The hold checks (SaveResult.held_ms against the budget) are correctness checks with a
generous margin for scheduling on a shared machine, not timing benchmarks: they catch an
agent held for room in the queue (seconds), not a slow millisecond.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from livingai_tasks import (
    Execution,
    ExecutionNode,
    NodeType,
    Status,
    StoreUnavailableError,
    decode,
    open_store,
)
from livingai_tasks.engine import CheckpointEngine
from livingai_tasks.engine.queued_write import QueuedWrite
from livingai_tasks.engine.spill import Spill, spill_folder
from livingai_tasks.nodes import ExecutionStatus, utcnow
from livingai_tasks.stores import Store
from livingai_tasks.stores.base import Updates

from .conftest import POSTGRES_URL, REDIS_URL, need_postgres, need_redis, pg_url
from .engine_support import wait_for
from .tcp_proxy import TcpProxy, proxy_for

pytestmark = [pytest.mark.services, pytest.mark.timeout(240)]

BUDGET_MS = 50.0
SLACK_MS = 250.0  # scheduling on a shared 2-core machine: see the module docstring
AGENTS = 20
QUEUE_MAX = 16  # far less than the saves made during the cut


class WriterKilled(BaseException):
    """Like asyncio.CancelledError: not an Exception, so `except Exception` misses it."""


class FaultyStore:
    """A real store whose write() can raise a given exception once, or keep refusing the
    batches that carry given node ids (as a store refusing one record would)."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url
        self.raise_once: BaseException | None = None
        self.refuse: set[str] = set()
        self.writes = 0

    def write(self, nodes: Sequence[ExecutionNode], updates: Updates) -> None:
        self.writes += 1
        if self.raise_once is not None:
            exc, self.raise_once = self.raise_once, None
            raise exc
        if any(n.id in self.refuse for n in nodes):
            raise StoreUnavailableError("the store keeps timing out on this record (test)")
        self.inner.write(nodes, updates)

    def append(self, nodes: Sequence[ExecutionNode]) -> None:
        self.write(nodes, ())

    def update_execution(self, execution_id: str, **changes: Any) -> None:
        self.write((), [(execution_id, changes)])

    def get_node(self, node_id: str) -> ExecutionNode | None:
        return self.inner.get_node(node_id)

    def node_versions(self, node_id: str) -> list[ExecutionNode]:
        return self.inner.node_versions(node_id)

    def nodes(self, execution_id: str) -> list[ExecutionNode]:
        return self.inner.nodes(execution_id)

    def latest_checkpoint(self, execution_id: str) -> ExecutionNode | None:
        return self.inner.latest_checkpoint(execution_id)

    def put_execution(self, execution: Execution) -> None:
        self.inner.put_execution(execution)

    def create_execution(self, execution: Execution) -> bool:
        return self.inner.create_execution(execution)

    def get_execution(self, execution_id: str) -> Execution | None:
        return self.inner.get_execution(execution_id)

    def list_executions(self, **kw: Any) -> list[Execution]:
        return self.inner.list_executions(**kw)

    def claim(self, execution_id: str, *, fence: int, owner: str, lease_s: float) -> bool:
        return self.inner.claim(execution_id, fence=fence, owner=owner, lease_s=lease_s)

    def migrate(self) -> None:
        self.inner.migrate()

    def close(self) -> None:
        self.inner.close()


def stored_once(store: Store, node_id: str) -> list[ExecutionNode]:
    """Every version of a node, a version sent twice (at least once: a reply lost in a cut)
    counted once."""
    every = store.node_versions(node_id)
    return [v for i, v in enumerate(every) if i == 0 or v != every[i - 1]]


# -- a writer thread killed ------------------------------------------------------------------
@pytest.mark.parametrize("store_url", ["sqlite", "postgres", "redis"], indirect=True)
def test_a_writer_killed_by_a_base_exception_is_restarted_and_loses_nothing(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    faulty = FaultyStore(store)
    engine = CheckpointEngine(faulty, budget_ms=BUDGET_MS, spill_dir=str(tmp_path / "spill"))
    try:
        base = ExecutionNode(execution_id="killed", type=NodeType.PROMPT, seq=1)
        saved: list[ExecutionNode] = []
        for i in range(12):
            if i == 5:
                faulty.raise_once = WriterKilled("cancelled by the test")
            version = base.evolve(output={"i": i})
            engine.save(version, f"state {i}".encode())
            saved.append(version)
            if i == 5:
                # Its death, not a dead thread: the save's own wait may already have
                # started it again.
                wait_for(lambda: any("writer thread died" in r.getMessage()
                                     for r in caplog.records))
        assert engine.flush(30)
        assert engine.metrics.counter("checkpoint_writer_restarts") == 1
        assert engine.metrics.counter("checkpoint_dropped") == 0
    finally:
        engine.close(5)
    stored = stored_once(store, base.id)
    assert [v.output for v in stored] == [v.output for v in saved]  # all of them, in order
    assert [decode(v.checkpoint or b"") for v in stored] == [
        f"state {i}".encode() for i in range(12)]
    deaths = [r for r in caplog.records if "writer thread died" in r.getMessage()]
    assert len(deaths) == 1 and "WriterKilled: cancelled by the test" in deaths[0].getMessage()
    pending = re.search(r"with (\d+) writes pending", deaths[0].getMessage())
    assert pending and int(pending[1]) >= 1  # the write in flight stayed queued
    assert deaths[0].exc_info is not None  # with its traceback


# -- a store cut off for longer than the queue can hold ---------------------------------------
@dataclass
class Cut:
    url: str  # through the proxy
    direct_url: str  # straight to the server, for a fresh reader
    proxy: TcpProxy


@pytest.fixture(params=["postgres", "redis"])
def cut(request: pytest.FixtureRequest) -> Iterator[Cut]:
    if request.param == "postgres":
        need_postgres()
        direct = pg_url(request.getfixturevalue("pg_schema"))
        proxy = proxy_for(POSTGRES_URL)
    else:
        need_redis()
        direct = f"{REDIS_URL}?prefix={request.getfixturevalue('redis_prefix')}"
        proxy = proxy_for(REDIS_URL)
    yield Cut(proxy.url(direct), direct, proxy)
    proxy.close()


@dataclass
class Agents:
    saved: dict[str, list[ExecutionNode]] = field(default_factory=dict)
    outcomes: list[str] = field(default_factory=list)
    held_ms: list[float] = field(default_factory=list)
    most_in_memory: int = 0


def run_agents(engine: CheckpointEngine, *, saves: int, during: threading.Event | None = None,
               pause_s: float = 0.01) -> Agents:
    """AGENTS threads, each saving `saves` versions of its own node (with a ~2 KB state);
    records every version saved, every outcome and hold, and the most writes ever held in
    memory (sampled after every save)."""
    out = Agents()
    lock = threading.Lock()

    def agent(worker: int) -> None:
        base = ExecutionNode(execution_id=f"agent-{worker}", type=NodeType.PROMPT, seq=1,
                             status=Status.RUNNING)
        for i in range(saves):
            version = base.evolve(output={"i": i})
            state = json.dumps({"worker": worker, "i": i, "pad": "x" * 2000}).encode()
            result = engine.save(version, state)
            wb = engine._current_writes()
            depth = wb.in_memory if wb is not None else 0
            with lock:
                out.saved.setdefault(version.id, []).append(version)
                out.outcomes.append(result.outcome)
                out.held_ms.append(result.held_ms)
                out.most_in_memory = max(out.most_in_memory, depth)
            time.sleep(pause_s)

    threads = [threading.Thread(target=agent, args=(w,)) for w in range(AGENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return out


def check_every_version_stored(url: str, saved: dict[str, list[ExecutionNode]]) -> None:
    fresh = open_store(url)
    try:
        for node_id, versions in saved.items():
            stored = stored_once(fresh, node_id)
            assert [v.output for v in stored] == [v.output for v in versions], node_id
            assert all(v.checkpoint is not None for v in stored)
    finally:
        fresh.close()


def test_a_cut_longer_than_the_queue_loses_nothing_holds_no_agent_and_bounds_memory(
    cut: Cut, tmp_path: Path,
) -> None:
    store = open_store(cut.url)
    store.migrate()
    engine = CheckpointEngine(store, budget_ms=BUDGET_MS, queue_max=QUEUE_MAX,
                              spill_dir=str(tmp_path / "spill"))
    try:
        engine.save(ExecutionNode(execution_id="warm", type=NodeType.PROMPT, seq=0),
                    durable=True)  # connected before the cut
        cut.proxy.cut()
        timer = threading.Timer(2.0, cut.proxy.restore)
        timer.start()
        agents = run_agents(engine, saves=40)
        timer.join()
        assert engine.flush(90), f"{engine.pending} writes still pending"
        counters = engine.metrics.as_dict()["counters"]
        spill_bytes = engine.metrics.gauge("checkpoint_spill_bytes")
    finally:
        engine.close(5)
        store.close()
    assert "dropped" not in agents.outcomes and counters["checkpoint_dropped"] == 0
    assert agents.outcomes.count("spilled") > 0  # the cut outlasted the queue
    assert counters["checkpoint_spilled"] == agents.outcomes.count("spilled")
    assert counters["checkpoint_spill_drained"] >= counters["checkpoint_spilled"]
    assert counters["checkpoint_store_errors"] > 0  # the cut was real
    assert agents.most_in_memory <= QUEUE_MAX
    assert max(agents.held_ms) < BUDGET_MS + SLACK_MS, sorted(agents.held_ms)[-5:]
    assert spill_bytes == 0
    check_every_version_stored(cut.direct_url, agents.saved)


def test_an_engine_closed_during_a_cut_spills_and_the_next_one_drains(
    cut: Cut, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    spill_dir = str(tmp_path / "spill")
    store = open_store(cut.url)
    store.migrate()
    engine = CheckpointEngine(store, budget_ms=BUDGET_MS, queue_max=QUEUE_MAX,
                              spill_dir=spill_dir)
    engine.save(ExecutionNode(execution_id="warm", type=NodeType.PROMPT, seq=0), durable=True)
    cut.proxy.cut()
    agents = run_agents(engine, saves=10, pause_s=0.005)
    left = engine.pending
    engine.close(1.0)  # the store is still cut off
    store.close()
    assert left > QUEUE_MAX and engine.metrics.counter("checkpoint_dropped") == 0
    assert "dropped" not in agents.outcomes
    closing = [r.getMessage() for r in caplog.records if "closed with" in r.getMessage()]
    assert len(closing) == 1 and f"{left} writes" in closing[0], closing
    assert "last error: " in closing[0] and "last error: )" not in closing[0]
    assert "Unavailable" in closing[0] or "Error" in closing[0]  # the store's real error

    cut.proxy.restore()
    store2 = open_store(cut.url)  # same URL, same spill_dir: a restarted worker
    engine2 = CheckpointEngine(store2, budget_ms=BUDGET_MS, queue_max=QUEUE_MAX,
                               spill_dir=spill_dir)
    try:
        assert engine2.flush(90)  # starts the writer, which claims the file and drains it
        assert engine2.metrics.counter("checkpoint_spill_claimed") == left
    finally:
        engine2.close(5)
        store2.close()
    check_every_version_stored(cut.direct_url, agents.saved)
    assert list(spill_folder(spill_dir, store2.url).glob("*.spill*")) == []


@pytest.mark.timeout(120)
def test_a_process_killed_after_spilling_leaves_its_writes_to_the_next_engine(
    cut: Cut, tmp_path: Path,
) -> None:
    spill_dir = str(tmp_path / "spill")
    script = textwrap.dedent("""
        import sys, time
        from livingai_tasks import ExecutionNode, NodeType, open_store
        from livingai_tasks.engine import CheckpointEngine
        url, spill_dir = sys.argv[1], sys.argv[2]
        engine = CheckpointEngine(open_store(url), budget_ms=50, queue_max=4,
                                  spill_dir=spill_dir)
        base = ExecutionNode(execution_id="killed-proc", type=NodeType.PROMPT, seq=1)
        outcomes = [engine.save(base.evolve(output={"i": i}), b"s%d" % i).outcome
                    for i in range(30)]
        print(base.id, ",".join(outcomes), flush=True)
        time.sleep(60)  # SIGKILLed here: no close(), no atexit
    """)
    migrated = open_store(cut.direct_url)
    migrated.migrate()
    migrated.close()
    cut.proxy.cut()
    proc = subprocess.Popen([sys.executable, "-c", script, cut.url, spill_dir],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        assert proc.stdout is not None
        node_id, shown = proc.stdout.readline().split()
        outcomes = shown.split(",")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert outcomes.count("spilled") == 30 - 4 and "dropped" not in outcomes
    cut.proxy.restore()
    store = open_store(cut.url)
    engine = CheckpointEngine(store, budget_ms=BUDGET_MS, spill_dir=spill_dir)
    try:
        assert engine.flush(60)
    finally:
        engine.close(5)
        store.close()
    fresh = open_store(cut.direct_url)
    try:
        stored = stored_once(fresh, node_id)
    finally:
        fresh.close()
    # The 4 writes it held in memory died with it (the lease covers them); every spilled
    # one reached the store, in order.
    assert [v.output for v in stored] == [{"i": i} for i in range(4, 30)]


# -- the priority lane -----------------------------------------------------------------------
@pytest.mark.parametrize("store_url", ["sqlite", "postgres"], indirect=True)
def test_a_lease_renewal_gets_through_while_a_data_write_is_stuck(
    store: Store, tmp_path: Path,
) -> None:
    faulty = FaultyStore(store)
    engine = CheckpointEngine(faulty, budget_ms=BUDGET_MS, spill_dir=str(tmp_path / "spill"))
    for eid in ("live", "dep"):
        store.create_execution(Execution(id=eid))
    stuck = ExecutionNode(execution_id="dep", type=NodeType.PROMPT, seq=1, status=Status.RUNNING)
    faulty.refuse.add(stuck.id)
    try:
        engine.save(stuck, b"stuck state")
        backlog = [ExecutionNode(execution_id="other", type=NodeType.PROMPT, seq=i)
                   for i in range(50)]
        for n in backlog:
            engine.save(n)
        engine.update_execution("dep", reason="first")  # data lane, behind the stuck write
        wait_for(lambda: engine.metrics.counter("checkpoint_store_errors") >= 2)

        deadline = time.time() + 15.0
        renewal = engine.update_execution("live", priority=True, lease_owner="worker-1",
                                          lease_deadline=deadline)
        assert renewal.outcome in ("durable", "queued")
        wait_for(lambda: (store.get_execution("live") or Execution(id="?")).lease_deadline
                 == deadline, timeout_s=10)
        # Dependent priority writes wait for the data writes they follow: a newer version
        # of the stuck node, and the same field of the same execution.
        done = stuck.evolve(status=Status.SUCCESS)
        engine.save(done, priority=True)
        engine.update_execution("dep", priority=True, reason="second")
        engine.update_execution("live", priority=True, lease_owner="worker-1",
                                lease_deadline=deadline + 1)
        wait_for(lambda: (store.get_execution("live") or Execution(id="?")).lease_deadline
                 == deadline + 1, timeout_s=10)
        assert store.get_node(stuck.id) is None
        assert (store.get_execution("dep") or Execution(id="?")).reason is None
        assert all(store.get_node(n.id) is None for n in backlog)  # still behind the stuck one

        faulty.refuse.clear()
        assert engine.flush(30)
    finally:
        engine.close(5)
    assert [v.status for v in store.node_versions(stuck.id)] == [Status.RUNNING, Status.SUCCESS]
    assert (store.get_execution("dep") or Execution(id="?")).reason == "second"
    assert all(store.get_node(n.id) is not None for n in backlog)


def test_a_data_write_made_after_a_waiting_priority_write_does_not_overtake_it(
    tmp_path: Path,
) -> None:
    store = open_store(f"sqlite:///{tmp_path}/store.db")
    store.migrate()
    faulty = FaultyStore(store)
    engine = CheckpointEngine(faulty, budget_ms=BUDGET_MS, spill_dir=str(tmp_path / "spill"))
    store.create_execution(Execution(id="e"))
    stuck = ExecutionNode(execution_id="e", type=NodeType.PROMPT, seq=1)
    faulty.refuse.add(stuck.id)
    try:
        engine.save(stuck)
        engine.update_execution("e", lease_deadline=1.0)  # data lane, behind the stuck write
        engine.update_execution("e", priority=True, lease_deadline=2.0)  # waits for it
        engine.update_execution("e", lease_deadline=3.0)  # made last: must land last
        wait_for(lambda: engine.metrics.counter("checkpoint_store_errors") >= 2)
        faulty.refuse.clear()
        assert engine.flush(30)
    finally:
        engine.close(5)
        store.close()
    check = open_store(f"sqlite:///{tmp_path}/store.db")
    try:
        assert (check.get_execution("e") or Execution(id="?")).lease_deadline == 3.0
    finally:
        check.close()


def test_the_spill_round_trips_every_kind_of_write_exactly(tmp_path: Path) -> None:
    node = ExecutionNode(execution_id="e", type=NodeType.TOOL, seq=3, input={"q": "ü\u2028"},
                         status=Status.SUCCESS, output={"n": 1.5}, checkpoint=b"\x00\x02blob")
    execution = Execution(id="e", metadata={"k": [1, None]})
    changes = {"status": ExecutionStatus.COMPLETED, "updated_at": utcnow(),
               "lease_deadline": 1234.5678, "metadata": {"a": "b"}, "reason": None}
    ops = [QueuedWrite("append", "e", 1, node=node),
           QueuedWrite("put", "e", 1, execution=execution),
           QueuedWrite("update", "e", 1, changes=changes)]
    spill = Spill(str(tmp_path), "memory://x")
    for op in ops:
        spill.append(op)
    back = spill.read(10, lambda row_id, what: pytest.fail(what))
    spill.close()
    assert back[0].node == node and back[0].node is not None
    assert back[0].node.checkpoint == node.checkpoint
    assert back[1].execution == execution
    assert back[2].changes == changes
    assert isinstance(back[2].changes["status"], ExecutionStatus)


def test_a_spill_emptied_by_the_store_and_spilled_again_reads_every_new_row(
    tmp_path: Path,
) -> None:
    # SQLite gives a new row max(id) + 1, so ids start over once the store has taken every
    # row: the read cursor must not skip the rows spilled after that.
    spill = Spill(str(tmp_path), "memory://x")
    try:
        spill.append(QueuedWrite("update", "e", 1, changes={"reason": "first"}))
        [first] = spill.read(10, lambda row_id, what: pytest.fail(what))
        assert first.spill is not None
        spill.written(*first.spill)  # the store has it: the file is empty again
        for reason in ("second", "third"):
            spill.append(QueuedWrite("update", "e", 1, changes={"reason": reason}))
        back = spill.read(10, lambda row_id, what: pytest.fail(what))
        assert [op.changes["reason"] for op in back] == ["second", "third"]
        assert spill.unread == 0
    finally:
        spill.close()


def test_two_live_engines_never_drain_the_same_spill_file(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture
                                                          ) -> None:
    first = Spill(str(tmp_path), "memory://x")
    first.append(QueuedWrite("update", "e", 1, changes={"reason": "r"}))
    second = Spill(str(tmp_path), "memory://x")
    assert second.claim_orphans() == 0  # the first is alive: its flock holds
    first.close()  # as at close() with the store down: its row stays for a successor
    caplog.set_level(logging.WARNING)
    assert second.claim_orphans() == 1
    assert [op.changes["reason"] for op in second.read(10, lambda *_: None)] == ["r"]
    second.close()


def test_close_with_a_hanging_store_spills_and_says_what_the_writer_waits_for(
    cut: Cut, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    spill_dir = str(tmp_path / "spill")
    store = open_store(cut.url)
    store.migrate()
    engine = CheckpointEngine(store, budget_ms=BUDGET_MS, queue_max=QUEUE_MAX,
                              spill_dir=spill_dir)
    engine.save(ExecutionNode(execution_id="warm", type=NodeType.PROMPT, seq=0), durable=True)
    cut.proxy.freeze()  # the server hangs: the writer's call neither returns nor fails
    base = ExecutionNode(execution_id="hang", type=NodeType.PROMPT, seq=1)
    saved = [base.evolve(output={"i": i}) for i in range(40)]
    results = [engine.save(v, b"s") for v in saved]
    assert max(r.held_ms for r in results) < BUDGET_MS + SLACK_MS
    wb = engine._current_writes()
    assert wb is not None
    engine.close(1.0)
    closing = [r.getMessage() for r in caplog.records if "closed with" in r.getMessage()]
    assert len(closing) == 1 and "40 writes" in closing[0], closing
    # No call failed yet (Redis's 3 s socket timeout is longer than close's 1 s): the
    # message says so, and for how long the writer has waited, never an empty error.
    assert "has waited" in closing[0] and "last error: )" not in closing[0]
    assert engine.metrics.counter("checkpoint_dropped") == 0
    cut.proxy.cut()  # the hung connections go (the writer's call fails: nothing landed)
    cut.proxy.thaw()
    cut.proxy.restore()
    wb.writer.thread.join(10)  # the closed engine's writer, back from its call, stops
    assert not wb.writer.is_alive()
    store.close()
    store2 = open_store(cut.url)
    engine2 = CheckpointEngine(store2, budget_ms=BUDGET_MS, spill_dir=spill_dir)
    try:
        assert engine2.flush(60)
    finally:
        engine2.close(5)
        store2.close()
    check_every_version_stored(cut.direct_url, {base.id: saved})
