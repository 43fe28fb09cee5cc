"""Read a run back from a FRESH process: durability, recovery and cold reads.

    python -m loadtest.tiers.readback JOB.json      (prints one JSON object on stdout)

A new interpreter has no hot cache, no queue and no connection, as a worker that replaces a
crashed one. It opens the store from its spec and, for both engines alike:
  * recovery: engine.latest(execution) per agent, which must decode to exactly the last
    state the agent saved (same node id, same digest);
  * durability: engine.load(node) of EVERY checkpoint saved, each checked byte for byte;
  * cold reads: the time of each of those loads (store read + decode), and of the very
    first one, which includes opening the store and connecting.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from ..core.machine import ROOT
from .plan import digest

__all__ = ["read_back"]

_TIMEOUT_S = 900.0


def read_back(jobs: list[tuple[str, dict[str, Any], list[dict[str, Any]]]]
              ) -> dict[str, dict[str, Any]]:
    """Run the readback of each (impl, spec, agents) job in ONE new interpreter, one job
    after the other (each with its own store, engine and connections); impl -> result.
    One interpreter for both engines: starting Python and importing the drivers takes a
    second or more, which is not what is measured."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as fh:
        json.dump([{"impl": i, "spec": s, "agents": a} for i, s, a in jobs], fh)
        job_file = Path(fh.name)
    try:
        proc = subprocess.run([sys.executable, "-m", "loadtest.tiers.readback", str(job_file)],
                              capture_output=True, text=True, timeout=_TIMEOUT_S, cwd=ROOT)
    finally:
        job_file.unlink(missing_ok=True)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        return {impl: {"error": f"readback exited {proc.returncode}: {tail}"}
                for impl, _, _ in jobs}
    results: dict[str, dict[str, Any]] = json.loads(proc.stdout)
    return results


class _Tally:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.first_ms: float | None = None
        self.latest_ms: list[float] = []
        self.read_ms: list[float] = []
        self.latest_ok = self.found = self.exact = self.total = 0
        self.failures: list[str] = []

    def latest(self, agent: dict[str, Any], start: float, node_id: str | None,
               state: bytes | None) -> None:
        elapsed = (time.perf_counter() - start) * 1000.0
        if self.first_ms is None:
            self.first_ms = (time.perf_counter() - self.t0) * 1000.0
        else:
            self.latest_ms.append(elapsed)
        want_id, want_digest = agent["checkpoints"][-1]
        if node_id == want_id and state is not None and digest(state) == want_digest:
            self.latest_ok += 1
        elif len(self.failures) < 5:
            self.failures.append(f"{agent['execution_id']}: latest is {node_id!r}, "
                                 f"want {want_id!r}")

    def load(self, want_digest: str, start: float, state: bytes | None, found: bool) -> None:
        self.read_ms.append((time.perf_counter() - start) * 1000.0)
        self.total += 1
        self.found += found
        self.exact += state is not None and digest(state) == want_digest

    def result(self, agents: int) -> dict[str, Any]:
        return {"agents": agents, "latest_ok": self.latest_ok, "total": self.total,
                "found": self.found, "exact": self.exact, "first_ms": self.first_ms,
                "latest_ms": self.latest_ms,
                "read_ms": self.read_ms, "failures": self.failures}


def _read_ours(spec: dict[str, Any], agents: list[dict[str, Any]]) -> dict[str, Any]:
    from livingai_tasks import CheckpointEngine, open_store

    store = open_store(spec["url"])  # imports its driver; connects on first use
    tally = _Tally()
    engine = CheckpointEngine(store)
    try:
        for agent in agents:
            start = time.perf_counter()
            got = engine.latest(agent["execution_id"])
            tally.latest(agent, start, got[0].id if got else None, got[1] if got else None)
        for agent in agents:
            for node_id, want in agent["checkpoints"]:
                start = time.perf_counter()
                loaded = engine.load(node_id)
                tally.load(want, start, loaded[1] if loaded else None, loaded is not None)
    finally:
        engine.close()
        store.close()
    return tally.result(len(agents))


async def _read_livingai(spec: dict[str, Any], agents: list[dict[str, Any]]) -> dict[str, Any]:
    import livingai

    from .baseline import close_livingai_store, import_driver, open_livingai_store

    import_driver(spec)  # as for ours: the import is not the read
    tally = _Tally()
    store = await open_livingai_store(spec)
    engine = livingai.CheckpointEngine(store)
    try:
        for agent in agents:
            start = time.perf_counter()
            got = await engine.latest(agent["execution_id"])
            tally.latest(agent, start, got[0].id if got else None, got[1] if got else None)
        for agent in agents:
            for node_id, want in agent["checkpoints"]:
                start = time.perf_counter()
                loaded = await engine.load(node_id)
                tally.load(want, start, loaded[1] if loaded else None, loaded is not None)
    finally:
        await close_livingai_store(store)
    return tally.result(len(agents))


def main(argv: list[str]) -> int:
    results: dict[str, Any] = {}
    for job in json.loads(Path(argv[1]).read_text()):
        try:
            if job["impl"] == "ours":
                results[job["impl"]] = _read_ours(job["spec"], job["agents"])
            else:
                results[job["impl"]] = asyncio.run(_read_livingai(job["spec"], job["agents"]))
        except Exception as exc:  # noqa: BLE001 - reported per job, the next one still runs
            results[job["impl"]] = {"error": f"{type(exc).__name__}: {exc}"}
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
