"""`python -m loadtest.fleet.record_path`: what recording costs one step on its own, in this
process, without Celery: the entry check with the RUNNING record (`append_if_new`), the
SUCCESS record (queued), and the writer thread sending it; process CPU per step (all
threads) over N steps carrying a ~20 KB state, and beside it the servers' (Redis and
PostgreSQL, from /proc: run it on a quiet machine). A before/after of a change to the
record path runs it from each commit's checkout (a worktree: `python -m` imports the
library from the working directory), alternating; the fleet benchmark is the whole
picture. Redis takes the entry check with the RUNNING record in one round trip
(append-if-new); the SQL stores take the lifecycle's other path: the entry read, then the
RUNNING version and the lease queued.

`--apart` lands each step's start before its outcome is saved (a flush between them), as a
step longer than the writer's gathering window does, and then reports what the store kept:
versions per step and bytes per step (core/footprint.py; PostgreSQL also after VACUUM FULL,
which drops the row versions an UPDATE left dead): a step's input is stored once if its
outcome took the place of its RUNNING version.

    python -m loadtest.fleet.record_path [--steps 1500] [--stores redis,postgres,sqlite,tiered]
                                         [--gap-ms 10] [--apart]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from livingai_tasks import CheckpointEngine, Execution, ExecutionNode, NodeType, Status, open_store

from ..core.footprint import footprint, total_bytes
from ..core.process_cpu import PartsClock, pids_named
from ..core.servers import Servers, execute_sql
from ..core.state import agent_state
from ..core.stats import median
from ..core.stores import STORE_KINDS, StoreSite, isolated

_SERVERS = ("redis", "postgres")


def _steps(engine: CheckpointEngine, n: int, state: dict[str, object], tag: str,
           gap_s: float = 0.0, apart: bool = False) -> tuple[float, dict[str, float]]:
    """CPU seconds for `n` steps, each of its own execution, recorded the way
    lifecycle.begin_step and outcomes.finish_node record them: this process's (every
    thread) and each server's."""
    for i in range(n):
        engine.store.create_execution(Execution(id=f"{tag}-e{i}"))
    servers = PartsClock({"redis": lambda: pids_named("redis-server"),
                          "postgres": lambda: pids_named("postgres")})
    servers.start()
    started = time.process_time()
    for i in range(n):
        node = ExecutionNode(
            id=f"{tag}-n{i}", execution_id=f"{tag}-e{i}", seq=1, type=NodeType.PROMPT,
            status=Status.RUNNING, input={"args": [state], "kwargs": {}},
            metadata={"task": "record_path.step", "idempotent": True, "attempt": 1,
                      "fence": 0, "owner": "bench", "worker": "bench"})
        lease: dict[str, Any] = {"current_node_id": node.id, "lease_owner": "bench",
                 "lease_deadline": time.time() + 15, "if_fence": 0}
        if engine.can_append_if_new(node.id):
            if engine.append_if_new(node, **lease) is not None:
                raise RuntimeError(f"node {node.id} existed already")
        else:
            if engine.store.get_node(node.id) is not None:
                raise RuntimeError(f"node {node.id} existed already")
            engine.save(node, wait=False)
            engine.update_execution(node.execution_id, wait=False, **lease)
        if apart and not engine.flush(10):
            raise RuntimeError("the writer did not drain in 10 s")
        engine.save(node.evolve(status=Status.SUCCESS, output=state, latency_ms=1), wait=False)
        if gap_s:
            time.sleep(gap_s)  # the rest of a step's life in Celery: the writer sends alone
    if not engine.flush(60):
        raise RuntimeError("the writer did not drain in 60 s")
    return time.process_time() - started, servers.stop()


def _measure(site: StoreSite, steps: int, rounds: int, state: dict[str, object],
             profile: Path | None, gap_s: float,
             apart: bool) -> tuple[list[float], dict[str, list[float]]]:
    store = open_store(site.url)
    store.migrate()
    engine = CheckpointEngine(store)
    try:
        _steps(engine, 50, state, "warm", apart=apart)
        profiler = cProfile.Profile() if profile is not None else None
        if profiler is not None:
            profiler.enable()
        spent = [_steps(engine, steps, state, f"r{r}", gap_s, apart) for r in range(rounds)]
        per_step = [own * 1000 / steps for own, _ in spent]
        servers = {name: [parts[name] * 1000 / steps for _, parts in spent] for name in _SERVERS}
        if profiler is not None and profile is not None:
            profiler.disable()
            profiler.dump_stats(profile)
        if apart:
            _kept(site, store, [f"{t}-n{i}" for t in ("warm", *(f"r{r}" for r in range(rounds)))
                                for i in range(50 if t == "warm" else steps)])
        return per_step, servers
    finally:
        engine.close()
        store.close()


def _kept(site: StoreSite, store: Any, node_ids: list[str]) -> None:
    """Print what the store kept of the steps `node_ids`: versions and bytes per step."""
    versions = sum(len(store.node_versions(node_id)) for node_id in node_ids)

    def per_step() -> float:
        return total_bytes(footprint(site.kind, redis_url=site.servers.redis_url,
                                     postgres_url=site.servers.postgres_url, name=site.name,
                                     store_url=site.url)) / len(node_ids) / 1000

    kept = f"{site.kind}: {versions / len(node_ids):.2f} versions and {per_step():.1f} KB per step"
    if site.schema is not None:
        execute_sql(site.servers.postgres_url,
                    f'VACUUM FULL "{site.schema}".lai_node_versions', autocommit=True)
        kept += f" ({per_step():.1f} KB after VACUUM FULL)"
    print(kept, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stores", default="redis",
                        help=f"comma-separated, from {','.join(STORE_KINDS)} (default redis)")
    parser.add_argument("--profile", type=Path, default=None,
                        help="a folder: cProfile stats per store written there (the main "
                             "thread only), top 25 by own time printed")
    parser.add_argument("--gap-ms", type=float, default=0.0,
                        help="idle time after each step (default 0: steps back to back, so "
                             "the writer sends many in one call; 10 is closer to a fleet, "
                             "where each step's records go alone)")
    parser.add_argument("--apart", action="store_true",
                        help="land each step's start before its outcome is saved, then "
                             "report the versions and bytes the store kept per step")
    args = parser.parse_args()
    if not args.gap_ms >= 0:
        parser.error(f"--gap-ms takes a number of ms >= 0, got {args.gap_ms}")
    kinds = [k.strip() for k in args.stores.split(",") if k.strip()]
    bad = [k for k in kinds if k not in STORE_KINDS]
    if bad or not kinds:
        parser.error(f"--stores takes {', '.join(STORE_KINDS)}, got {args.stores!r}")
    state = json.loads(agent_state(20_000, agent=1))
    servers = Servers()
    with tempfile.TemporaryDirectory(prefix="lt-rp-") as folder:
        for kind in kinds:
            name = f"lt-rp-{uuid.uuid4().hex[:8]}"
            with isolated(servers, kind, name, Path(folder)) as site:
                out = args.profile / f"{kind}.prof" if args.profile else None
                if out is not None:
                    out.parent.mkdir(parents=True, exist_ok=True)
                per_step, server_ms = _measure(site, args.steps, args.rounds, state, out,
                                             args.gap_ms / 1000, args.apart)
            shown = "; ".join(f"{name} server {median(ms):.3f} ms" for name, ms in server_ms.items()
                              if median(ms) > 0)
            print(f"record path, {kind}, {args.steps} steps x {args.rounds} rounds, 20 KB "
                  f"state, {args.gap_ms:g} ms apart: CPU per step median "
                  f"{median(per_step):.3f} ms (rounds "
                  f"{', '.join(f'{x:.3f}' for x in per_step)}); {shown or 'no server CPU'}",
                  flush=True)
            if out is not None:
                pstats.Stats(str(out)).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
