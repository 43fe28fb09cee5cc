"""What one run of a plan against one store records, for either engine.

Both drivers (ours.py, baseline.py) fill a RunRecord; figures.py turns it into numbers. Times
are time.perf_counter() seconds of the driving process, so "time to durable" is one clock:
from the agent's call to the moment the store acknowledged the write.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Sample", "RunRecord", "AckTimes"]


@dataclass
class Sample:
    """One save as the agent saw it."""

    agent: int
    step: int
    node_id: str
    t_call: float  # perf_counter() just before the call
    held_ms: float  # what the agent was held (ours: SaveResult.held_ms; livingai: wall)
    wall_ms: float  # perf_counter() around the call, for both
    durable: bool  # the store had it when the call returned (livingai: save() -> True)
    dropped: bool  # the engine gave up on it for good at once (ours: SaveResult.dropped)
    state_bytes: int
    blob_bytes: int
    # CPU time of the agent's own thread inside save() (ours; None for livingai, whose saves
    # share one event-loop thread): the hold minus this is time spent waiting.
    cpu_ms: float | None = None


class AckTimes:
    """node id -> perf_counter() when the store acknowledged that node's write, and how
    long each store call took (to tell the store's time from the engine's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.times: dict[str, float] = {}
        self.write_ms: list[float] = []  # each successful store write call, wall
        self.batch_sizes: list[int] = []
        self.in_flight = 0

    def started(self) -> float:
        with self._lock:
            self.in_flight += 1
        return time.perf_counter()

    def finished(self, node_ids: list[str], ok: bool, started: float) -> None:
        now = time.perf_counter()
        with self._lock:
            self.in_flight -= 1
            if ok:
                self.write_ms.append((now - started) * 1000.0)
                self.batch_sizes.append(len(node_ids))
                for node_id in node_ids:
                    self.times.setdefault(node_id, now)


@dataclass
class RunRecord:
    impl: str
    kind: str
    samples: list[Sample] = field(default_factory=list)
    acks: AckTimes = field(default_factory=AckTimes)
    started: float = 0.0  # the agents were released
    saves_done: float = 0.0  # the last save returned
    settled: float = 0.0  # every write the engine still had landed (or was given up)
    settled_ok: bool = True  # False: the drain timed out
    cpu_s: float = 0.0  # process CPU time from release to settled, all threads
    encode_ms: list[float] = field(default_factory=list)  # per encode, wall, where known
    encode_ms_sum: float | None = None
    hot_read_ms: list[float] = field(default_factory=list)
    save_errors: int = 0  # save() raised (livingai only: ours never raised here)
    first_error: str = ""
    engine_metrics: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
