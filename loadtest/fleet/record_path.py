"""`python -m loadtest.fleet.record_path`: what recording costs one step on its own, in this
process, without Celery: the entry check with the RUNNING record (`append_if_new`), the
SUCCESS record (queued), and the writer thread sending it; process CPU per step (all
threads) over N steps carrying a ~20 KB state. A before/after of a change to the record path
runs it on both commits (`PYTHONPATH=<worktree>`), alternating; the fleet benchmark is the
whole picture. Redis stores only (the entry check in one round trip is theirs).

    python -m loadtest.fleet.record_path [--steps 1500] [--redis redis://127.0.0.1:6379/0]
"""

from __future__ import annotations

import argparse
import json
import time
import uuid

from livingai_tasks import CheckpointEngine, Execution, ExecutionNode, NodeType, Status, open_store

from ..core.servers import Servers, delete_keys
from ..core.state import agent_state
from ..core.stats import median


def _steps(engine: CheckpointEngine, n: int, state: dict[str, object], tag: str) -> float:
    """CPU seconds (this process, every thread) for `n` steps, each of its own execution."""
    for i in range(n):
        engine.store.create_execution(Execution(id=f"{tag}-e{i}"))
    started = time.process_time()
    for i in range(n):
        node = ExecutionNode(
            id=f"{tag}-n{i}", execution_id=f"{tag}-e{i}", seq=1, type=NodeType.PROMPT,
            status=Status.RUNNING, input={"args": [state], "kwargs": {}},
            metadata={"task": "record_path.step", "idempotent": True, "attempt": 1,
                      "fence": 0, "owner": "bench", "worker": "bench"})
        lease = {"current_node_id": node.id, "lease_owner": "bench",
                 "lease_deadline": time.time() + 15, "if_fence": 0}
        if engine.append_if_new(node, **lease) is not None:
            raise RuntimeError(f"node {node.id} existed already")
        engine.save(node.evolve(status=Status.SUCCESS, output=state, latency_ms=1), wait=False)
    if not engine.flush(60):
        raise RuntimeError("the writer did not drain in 60 s")
    return time.process_time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--redis", default=Servers().redis_url)
    args = parser.parse_args()
    prefix = f"lt-rp-{uuid.uuid4().hex[:8]}"
    store = open_store(f"{args.redis}?prefix={prefix}")
    engine = CheckpointEngine(store)
    state = json.loads(agent_state(20_000, agent=1))
    try:
        _steps(engine, 50, state, "warm")
        per_step = [_steps(engine, args.steps, state, f"r{r}") * 1000 / args.steps
                    for r in range(args.rounds)]
    finally:
        engine.close()
        store.close()
        delete_keys(args.redis, f"{prefix}:*")
    print(f"record path, {args.steps} steps x {args.rounds} rounds, 20 KB state: CPU per step "
          f"median {median(per_step):.3f} ms (rounds {', '.join(f'{x:.3f}' for x in per_step)})")


if __name__ == "__main__":
    main()
