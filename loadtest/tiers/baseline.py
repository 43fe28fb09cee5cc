"""Drive livingai 0.4.1 (the baseline) with the same Plan, on the same real servers.

livingai's API is async (`await engine.save(node, state) -> bool`), so concurrent agents are
tasks on one event loop: that is how an async agent host runs it. What the agent feels is
the wall time around `await engine.save(...)`: its zlib compression (done on the event loop)
plus the store write, which livingai cancels once `overhead_budget_ms` is spent (save() then
returns False: a "missed" checkpoint).

Stores, as livingai ships them: SQLiteStore on a file; stores.redis.RedisStore on the real
Redis through redis.asyncio (not fakeredis); stores.postgres.PostgresStore on the real
PostgreSQL through asyncpg, its pool given `search_path` = our schema so its `lai_nodes`
table lands there. livingai has no tiered store.

Acknowledgement times are taken the same way as ours: when the store's own write returned.
For SQLite that is the write in the worker thread, which goes on after livingai cancels the
await; for Redis and PostgreSQL a cancelled write is abandoned mid-way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from ..core.progress import Task
from .figures import BUDGET_MS
from .plan import Plan
from .runs import AckTimes, RunRecord, Sample

__all__ = ["run_plan", "open_livingai_store", "close_livingai_store", "import_driver"]

_DRAIN_TIMEOUT_S = 300.0


def import_driver(spec: dict[str, Any]) -> None:
    if spec["kind"] == "redis":
        import livingai.stores.redis  # noqa: F401
    elif spec["kind"] == "postgres":
        import livingai.stores.postgres  # noqa: F401


async def open_livingai_store(spec: dict[str, Any], acks: AckTimes | None = None) -> Any:
    """livingai's store for a Target spec; with `acks`, its writes are timed."""
    kind = spec["kind"]
    if kind == "sqlite":
        from livingai.storage import SQLiteStore

        class AckingSQLite(SQLiteStore):
            # The write itself, in asyncio.to_thread's worker: it completes even when
            # livingai has cancelled the await on it.
            def _write_sync(self, node: Any) -> None:
                if acks is None:
                    super()._write_sync(node)
                    return
                started = acks.started()
                ok = False
                try:
                    super()._write_sync(node)
                    ok = True
                finally:
                    acks.finished([node.id], ok, started)

        return AckingSQLite(spec["path"])
    if kind == "redis":
        from livingai.stores.redis import RedisStore

        store: Any = RedisStore(url=spec["redis_url"])
    elif kind == "postgres":
        import asyncpg
        from livingai.stores.postgres import PostgresStore

        # livingai builds its pool with asyncpg.create_pool(dsn) and asyncpg's default size
        # (10); we build the same pool, plus the search_path that isolates this run.
        pool = await asyncpg.create_pool(spec["dsn"],
                                         server_settings={"search_path": spec["schema"]})
        store = PostgresStore(pool=pool)
        await store.initialize()
    else:
        raise ValueError(f"livingai 0.4.1 has no {kind!r} store")
    return store if acks is None else _AckingAsync(store, acks)


async def close_livingai_store(store: Any) -> None:
    inner = getattr(store, "inner", store)
    result = inner.close()
    if asyncio.iscoroutine(result):
        await result


class _AckingAsync:
    """Forwards an async livingai store, timing write()."""

    def __init__(self, inner: Any, acks: AckTimes) -> None:
        self.inner = inner
        self.acks = acks

    async def write(self, node: Any) -> None:
        started = self.acks.started()
        ok = False
        try:
            await self.inner.write(node)
            ok = True
        finally:
            self.acks.finished([node.id], ok, started)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _timed_compressor(record: RunRecord) -> Any:
    from livingai.compression import ZlibCompressor

    class TimedZlib(ZlibCompressor):
        """livingai's default compressor (zlib level 6), timed."""

        def compress(self, data: bytes) -> bytes:
            start = time.perf_counter()
            out = super().compress(data)
            record.encode_ms.append((time.perf_counter() - start) * 1000.0)
            return out

    return TimedZlib()


def run_plan(
    spec: dict[str, Any],
    plan: Plan,
    ns: str,
    task: Task,
    *,
    hot_capacity: int = 128,
    hot_reads: int = 0,
) -> RunRecord:
    """Run every agent of `plan` as a task on one event loop against a fresh livingai engine."""
    plan.prepare()
    record = RunRecord("livingai", spec["kind"])
    # livingai logs a WARNING for every missed checkpoint; the readback counts them instead.
    logging.getLogger("livingai").setLevel(logging.ERROR)
    asyncio.run(_run(spec, plan, ns, task, record, hot_capacity, hot_reads))
    if record.encode_ms:
        record.encode_ms_sum = sum(record.encode_ms)
    return record


async def _run(spec: dict[str, Any], plan: Plan, ns: str, task: Task, record: RunRecord,
               hot_capacity: int, hot_reads: int) -> None:
    import livingai

    store = await open_livingai_store(spec, record.acks)
    engine = livingai.CheckpointEngine(store, overhead_budget_ms=BUDGET_MS,
                                       compressor=_timed_compressor(record),
                                       hot_capacity=hot_capacity)
    try:
        # Connect before timing, as for ours.
        warm = livingai.ExecutionNode(execution_id=f"{ns}-warmup", type=livingai.NodeType.PROMPT,
                                      id=f"{ns}-warmup-node")
        await store.write(warm)
        record.encode_ms.clear()
        await _agents(engine, plan, ns, task, record)
        if hot_reads:
            last = plan.node_id(ns, 0, len(plan.sizes[0]) - 1)
            for _ in range(hot_reads):
                start = time.perf_counter()
                await engine.load(last)
                record.hot_read_ms.append((time.perf_counter() - start) * 1000.0)
        record.engine_metrics = {"counters": engine.metrics.snapshot()["counters"]}
    finally:
        await close_livingai_store(store)


async def _agents(engine: Any, plan: Plan, ns: str, task: Task, record: RunRecord) -> None:
    import livingai

    go = asyncio.Event()
    per_agent: list[list[Sample]] = [[] for _ in range(plan.agents)]

    async def agent(a: int) -> None:
        thinks = plan.thinks(a)
        await go.wait()
        for step in range(len(plan.sizes[a])):
            if thinks[step]:
                await asyncio.sleep(thinks[step])
            state = plan.state(a, step)
            node = livingai.ExecutionNode(
                execution_id=plan.execution_id(ns, a), type=livingai.NodeType.PROMPT,
                id=plan.node_id(ns, a, step), status=livingai.Status.SUCCESS,
                input={"step": step}, output={"tokens": 800 + step},
            )
            t_call = time.perf_counter()
            try:
                ok = await engine.save(node, state)
            except Exception as exc:  # noqa: BLE001 - counted: the agent would see it
                ok = False
                record.save_errors += 1
                record.first_error = record.first_error or f"{type(exc).__name__}: {exc}"
            wall_ms = (time.perf_counter() - t_call) * 1000.0
            blob = node.checkpoint or b""
            per_agent[a].append(Sample(a, step, node.id, t_call, wall_ms, wall_ms, bool(ok),
                                       not ok, len(state), len(blob)))
            task.advance()

    tasks = [asyncio.create_task(agent(a)) for a in range(plan.agents)]
    await asyncio.sleep(0)  # every task is now waiting on `go`
    cpu0 = time.process_time()
    record.started = time.perf_counter()
    go.set()
    await asyncio.gather(*tasks)
    record.saves_done = time.perf_counter()
    # Writes livingai stopped waiting for may still be running (SQLite's worker threads).
    deadline = time.monotonic() + _DRAIN_TIMEOUT_S
    while record.acks.in_flight > 0 and time.monotonic() < deadline:
        await asyncio.sleep(0.001)
    record.settled_ok = record.acks.in_flight == 0
    record.settled = time.perf_counter()
    record.cpu_s = time.process_time() - cpu0
    record.samples = [s for samples in per_agent for s in samples]
