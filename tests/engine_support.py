"""What the engine's tests share: a store that can be made slow, failing or blocked, and
engines over it that are closed after each test."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from livingai_tasks import Execution, ExecutionNode, NodeType, StoreUnavailableError
from livingai_tasks.engine import CheckpointEngine
from livingai_tasks.stores.base import Updates
from livingai_tasks.stores.memory import MemoryStore

SLACK_MS = 250.0  # timing asserts are generous: this runs on a shared 2-core machine


class ControlledStore:
    """A MemoryStore whose writes can be made slow, failing or blocked on demand.

    `calls` lists the writes that succeeded, in order: ("write", [node ids], [execution ids
    of the updates]), ("put", execution id).
    """

    def __init__(self) -> None:
        self.inner = MemoryStore()
        self.url = "memory://controlled"
        self.delay_s = 0.0
        self.down: type[Exception] | None = None  # raise this from every write
        self.reads_down = False  # and from latest_checkpoint / get_node
        self.gate = threading.Event()  # cleared: writes wait here
        self.gate.set()
        self.poison: set[str] = set()  # node ids whose append raises TypeError
        self.lose_replies = 0  # this many writes of nodes land, then raise as if the reply was lost
        self.calls: list[tuple[str, Any]] = []
        self.attempts = 0

    def release(self) -> None:
        self.down = None
        self.delay_s = 0.0
        self.gate.set()

    def _write(self) -> None:
        self.attempts += 1
        self.gate.wait(30)
        if self.delay_s:
            time.sleep(self.delay_s)
        if self.down is not None:
            raise self.down("store is down (test)")

    def _read(self) -> None:
        if self.reads_down and self.down is not None:
            raise self.down("store is down (test)")

    def write(self, nodes: Sequence[ExecutionNode], updates: Updates) -> None:
        self._write()
        if any(n.id in self.poison for n in nodes):
            raise TypeError("cannot store this one (test)")
        self.inner.write(nodes, updates)
        self.calls.append(("write", [n.id for n in nodes], [eid for eid, _ in updates]))
        if self.lose_replies and nodes:
            self.lose_replies -= 1
            raise StoreUnavailableError("connection lost before the reply (test)")

    def append(self, nodes: Sequence[ExecutionNode]) -> None:
        self.write(nodes, ())

    def update_execution(self, execution_id: str, **changes: Any) -> None:
        self.write((), [(execution_id, changes)])

    def put_execution(self, execution: Execution) -> None:
        self._write()
        self.inner.put_execution(execution)
        self.calls.append(("put", execution.id))

    def create_execution(self, execution: Execution) -> bool:
        return self.inner.create_execution(execution)

    def get_node(self, node_id: str) -> ExecutionNode | None:
        self._read()
        return self.inner.get_node(node_id)

    def latest_checkpoint(self, execution_id: str) -> ExecutionNode | None:
        self._read()
        return self.inner.latest_checkpoint(execution_id)

    def node_versions(self, node_id: str) -> list[ExecutionNode]:
        return self.inner.node_versions(node_id)

    def nodes(self, execution_id: str) -> list[ExecutionNode]:
        return self.inner.nodes(execution_id)

    def get_execution(self, execution_id: str) -> Execution | None:
        return self.inner.get_execution(execution_id)

    def list_executions(self, **kw: Any) -> list[Execution]:
        return self.inner.list_executions(**kw)

    def claim(self, execution_id: str, *, fence: int, owner: str, lease_s: float) -> bool:
        return self.inner.claim(execution_id, fence=fence, owner=owner, lease_s=lease_s)

    def migrate(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def cstore() -> Iterator[ControlledStore]:
    store = ControlledStore()
    yield store
    store.release()


@pytest.fixture
def make_engine(cstore: ControlledStore,
                tmp_path: Path) -> Iterator[Callable[..., CheckpointEngine]]:
    engines: list[CheckpointEngine] = []

    def make(store: Any = None, **kw: Any) -> CheckpointEngine:
        # These tests are about the budget: wait for the store up to it, unless told not to.
        kw.setdefault("durable_wait_ms", None)
        # A spill folder of this test's own: no test drains another's spilled writes.
        kw.setdefault("spill_dir", str(tmp_path / "spill"))
        engine = CheckpointEngine(store if store is not None else cstore, **kw)
        engines.append(engine)
        return engine

    yield make
    cstore.release()
    for engine in engines:
        engine.close(2.0)


def node(execution_id: str = "e1", seq: int = 1, **kw: Any) -> ExecutionNode:
    return ExecutionNode(execution_id=execution_id, type=kw.pop("type", NodeType.PROMPT),
                         seq=seq, **kw)


def counter(engine: CheckpointEngine, name: str) -> float:
    return engine.metrics.counter(name)


def wait_for(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)
