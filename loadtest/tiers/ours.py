"""Drive livingai_tasks' CheckpointEngine with a Plan: one thread per agent, one engine.

Threads in one process sharing one engine is how a Celery worker with the threads pool (or
any multi-threaded agent host) uses it: one writer thread and one hot cache per process.

The store is wrapped in _AckingStore, which notes when each write() returned: that is the
moment the store had the checkpoint, so time to durable is measured per checkpoint, from the
agent's call, with no polling and without touching the engine.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any, cast

from livingai_tasks import CheckpointEngine, ExecutionNode, NodeType, Status, Store, open_store

from ..core.progress import Task
from .plan import Plan
from .runs import AckTimes, RunRecord, Sample

__all__ = ["run_plan", "run_floor"]

_DRAIN_TIMEOUT_S = 300.0


class _AckingStore:
    """A Store that forwards everything and times write() (the engine's writer calls it)."""

    def __init__(self, inner: Store, acks: AckTimes) -> None:
        self.inner = inner
        self.acks = acks
        self.url = inner.url

    def write(self, nodes: Sequence[ExecutionNode], updates: Any) -> None:
        started = self.acks.started()
        ok = False
        try:
            self.inner.write(nodes, updates)
            ok = True
        finally:
            self.acks.finished([n.id for n in nodes], ok, started)

    def append(self, nodes: Sequence[ExecutionNode]) -> None:
        self.write(nodes, ())

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    # Spelled out: the engine checks isinstance(store, Store), a runtime Protocol check
    # that wants each method on the object itself.
    def get_node(self, node_id: str) -> Any:
        return self.inner.get_node(node_id)

    def node_versions(self, node_id: str) -> Any:
        return self.inner.node_versions(node_id)

    def nodes(self, execution_id: str) -> Any:
        return self.inner.nodes(execution_id)

    def latest_checkpoint(self, execution_id: str) -> Any:
        return self.inner.latest_checkpoint(execution_id)

    def put_execution(self, execution: Any) -> Any:
        return self.inner.put_execution(execution)

    def create_execution(self, execution: Any) -> Any:
        return self.inner.create_execution(execution)

    def update_execution(self, execution_id: str, **changes: Any) -> Any:
        return self.inner.update_execution(execution_id, **changes)

    def get_execution(self, execution_id: str) -> Any:
        return self.inner.get_execution(execution_id)

    def list_executions(self, **kwargs: Any) -> Any:
        return self.inner.list_executions(**kwargs)

    def claim(self, execution_id: str, **kwargs: Any) -> Any:
        return self.inner.claim(execution_id, **kwargs)

    def migrate(self) -> None:
        self.inner.migrate()

    def close(self) -> None:
        self.inner.close()


def _node(plan: Plan, ns: str, agent: int, step: int) -> ExecutionNode:
    return ExecutionNode(
        execution_id=plan.execution_id(ns, agent), type=NodeType.PROMPT,
        id=plan.node_id(ns, agent, step), seq=step, status=Status.SUCCESS,
        input={"step": step}, output={"tokens": 800 + step},
    )


def run_plan(
    url: str,
    plan: Plan,
    ns: str,
    task: Task,
    *,
    engine_kwargs: dict[str, Any] | None = None,
    hot_reads: int = 0,
) -> RunRecord:
    """Run every agent of `plan` in its own thread against a fresh engine on `url`."""
    plan.prepare()
    record = RunRecord("ours", url.split(":", 1)[0])
    store = open_store(url)
    store.migrate()
    acking = _AckingStore(store, record.acks)
    engine = CheckpointEngine(acking, **(engine_kwargs or {}))
    try:
        # Connect and start the writer before timing: a worker does this at process start.
        warm = ExecutionNode(execution_id=f"{ns}-warmup", type=NodeType.PROMPT,
                             id=f"{ns}-warmup-node")
        engine.save(warm, b'{"warmup":true}', durable=True)
        engine.metrics.reset()
        _run_agents(engine, plan, ns, task, record)
        record.engine_metrics = engine.metrics.as_dict()
        encode = record.engine_metrics["histograms"].get("checkpoint_encode_ms", {})
        record.encode_ms_sum = encode.get("sum")
        if hot_reads:
            last = plan.node_id(ns, 0, len(plan.sizes[0]) - 1)
            for _ in range(hot_reads):
                start = time.perf_counter()
                engine.load(last)
                record.hot_read_ms.append((time.perf_counter() - start) * 1000.0)
            hits = engine.metrics.counter("checkpoint_hot_hits")
            if hits < hot_reads:
                record.notes.append(f"only {hits:.0f} of {hot_reads} hot reads hit the cache")
    finally:
        engine.close(timeout_s=_DRAIN_TIMEOUT_S)
        store.close()
    return record


class _CpuOnlySave:
    """A save that only burns `cpu_s` of its thread's CPU time: no lock, no I/O, no other
    thread. Run through the same threads as the engine with the engine's median save CPU, it
    shows how often that much Python alone is held past the budget, waiting for the GIL."""

    def __init__(self, cpu_s: float) -> None:
        self.cpu_s = cpu_s

    def save(self, node: ExecutionNode, state: bytes) -> Any:
        start = time.perf_counter()
        until = time.thread_time() + self.cpu_s
        while time.thread_time() < until:
            pass
        return _CpuOnlyResult(node, (time.perf_counter() - start) * 1000.0)

    def flush(self, timeout_s: float) -> bool:
        return True  # nothing is ever pending


class _CpuOnlyResult:
    durable = True
    dropped = False

    def __init__(self, node: ExecutionNode, held_ms: float) -> None:
        self.node, self.held_ms = node, held_ms


def run_floor(plan: Plan, ns: str, task: Task, cpu_ms: float) -> RunRecord:
    """`plan`'s agents in the same threads as run_plan(), each save `cpu_ms` of CPU only."""
    plan.prepare()
    record = RunRecord("floor", "none")
    _run_agents(cast(Any, _CpuOnlySave(cpu_ms / 1000.0)), plan, ns, task, record)
    return record


def _run_agents(engine: CheckpointEngine, plan: Plan, ns: str, task: Task,
                record: RunRecord) -> None:
    barrier = threading.Barrier(plan.agents + 1)
    per_agent: list[list[Sample]] = [[] for _ in range(plan.agents)]
    errors: list[BaseException] = []

    def agent(a: int) -> None:
        try:
            thinks = plan.thinks(a)
            barrier.wait()
            for step in range(len(plan.sizes[a])):
                if thinks[step]:
                    time.sleep(thinks[step])
                state = plan.state(a, step)  # the agent's own work, not timed
                node = _node(plan, ns, a, step)
                cpu0 = time.thread_time()
                t_call = time.perf_counter()
                result = engine.save(node, state)
                wall_ms = (time.perf_counter() - t_call) * 1000.0
                cpu_ms = (time.thread_time() - cpu0) * 1000.0
                blob = result.node.checkpoint
                per_agent[a].append(Sample(a, step, node.id, t_call, result.held_ms, wall_ms,
                                           result.durable, result.dropped, len(state),
                                           len(blob) if blob is not None else 0, cpu_ms))
                task.advance()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=agent, args=(a,), name=f"agent-{a}", daemon=True)
               for a in range(plan.agents)]
    for thread in threads:
        thread.start()
    cpu0 = time.process_time()
    barrier.wait()
    record.started = time.perf_counter()
    for thread in threads:
        thread.join()
    record.saves_done = time.perf_counter()
    record.settled_ok = engine.flush(timeout_s=_DRAIN_TIMEOUT_S)
    record.settled = time.perf_counter()
    record.cpu_s = time.process_time() - cpu0
    if errors:
        raise errors[0]
    record.samples = [s for samples in per_agent for s in samples]

