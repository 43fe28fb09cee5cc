"""The chaos run's fault kinds, and the injectors that cause them on a live fleet.

    sigkill-child   SIGKILL one pool child of a step worker (the worker forks a new one)
    sigkill-worker  SIGKILL a step worker's main process (its pool child dies with it), then
                    start it again at once, as a supervisor would
    sigstop         SIGSTOP a step worker's whole process group for longer than the lease and
                    the worker TTL, then SIGCONT: a paused "zombie" that wakes up after
                    recovery gave its work to another worker
    store-outage    cut the TCP proxy between the workers and the store's server(s) for N s
    broker-outage   cut the TCP proxy between the workers (and beat) and the broker for N s

The servers themselves are never stopped: other users of this machine share them, so an outage
is a cut of our own proxy (loadtest/core/tcp_proxy.py), which is what the workers see of a
server restart or a network partition. The harness (which starts executions and reads the
store) talks to the servers directly.
"""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..core.tcp_proxy import TcpProxy
from ..fleet.processes import Proc, children_of
from .record import Kill

__all__ = ["FAULT_KINDS", "SERVER_STORES", "parse_faults", "applies", "KillInjector",
           "StopInjector", "Outage", "OutageInjector"]

FAULT_KINDS = ("sigkill-child", "sigkill-worker", "sigstop", "store-outage", "broker-outage")
# Stores behind a server the proxy can stand in front of (sqlite is a local file).
SERVER_STORES = ("redis", "postgres", "tiered")


def parse_faults(text: str) -> tuple[str, ...]:
    """The fault kinds a comma-separated list names, in FAULT_KINDS order; ValueError with
    the accepted names otherwise."""
    wanted = [w.strip() for w in text.split(",") if w.strip()]
    if not wanted:
        raise ValueError(f"no fault named; choose from {', '.join(FAULT_KINDS)}")
    for name in wanted:
        if name not in FAULT_KINDS:
            raise ValueError(f"unknown fault {name!r}; choose from {', '.join(FAULT_KINDS)}")
    return tuple(k for k in FAULT_KINDS if k in wanted)


def applies(fault: str, store: str) -> str | None:
    """Why `fault` cannot run against a store of kind `store`; None if it can."""
    if fault == "store-outage" and store not in SERVER_STORES:
        return (f"store-outage needs a store behind a server ({', '.join(SERVER_STORES)}); "
                f"{store} is a local file")
    return None


def _ready(workers: Sequence[Proc]) -> list[Proc]:
    return [w for w in workers if w.ready() and children_of(w.pid)]


class KillInjector:
    """Every `every_s` (uniform), SIGKILL a ready step worker's pool child (mode "child")
    or its main process ("main", restarted at once); the i-th kill has mode
    `modes[i % len(modes)]`; at most `limit` kills."""

    def __init__(self, modes: Sequence[str], workers: list[Proc], rng: random.Random,
                 every_s: tuple[float, float], limit: int) -> None:
        self.modes = tuple(modes)
        self.workers = workers
        self.rng = rng
        self.every_s = every_s
        self.limit = limit
        self.kills: list[Kill] = []
        self.next_at = time.time() + rng.uniform(*every_s)

    def tick(self) -> str | None:
        if len(self.kills) >= self.limit or time.time() < self.next_at:
            return None
        ready = _ready(self.workers)
        if not ready:
            return None  # all restarting: try again shortly
        self.next_at = time.time() + self.rng.uniform(*self.every_s)
        worker = self.rng.choice(ready)
        mode = self.modes[len(self.kills) % len(self.modes)]
        # The time is taken right before the signal, after any /proc scan (milliseconds,
        # in which a step can finish): a step done before it was not hit by the kill.
        if mode == "main":
            pids = worker.kill_main()
            t = worker.killed_at
            worker.start()  # the supervisor restarts it at once
        else:
            pids = children_of(worker.pid)[:1]
            t = time.time()
            for pid in pids:
                os.kill(pid, signal.SIGKILL)  # the worker stays up and forks a new child
        self.kills.append(Kill(t, mode, worker.name, pids))
        return f"SIGKILL {mode} of {worker.name} (pids {pids})"

    def busy(self) -> bool:
        return False

    def finish(self) -> None:
        pass


class StopInjector:
    """SIGSTOP a ready step worker's process group (main process and pool child) for
    `pause_s`, then SIGCONT; one at a time, `gap_s` between the SIGCONT and the next stop,
    at most `limit` stops."""

    def __init__(self, workers: list[Proc], rng: random.Random, *, pause_s: float,
                 gap_s: tuple[float, float], limit: int) -> None:
        self.workers = workers
        self.rng = rng
        self.pause_s = pause_s
        self.gap_s = gap_s
        self.limit = limit
        self.kills: list[Kill] = []
        self.stopped: tuple[Proc, Kill] | None = None
        self.next_at = time.time() + rng.uniform(*gap_s)

    def tick(self) -> str | None:
        now = time.time()
        if self.stopped is not None:
            if now < self.stopped[1].t + self.pause_s:
                return None
            return self._resume()
        if len(self.kills) >= self.limit or now < self.next_at:
            return None
        ready = _ready(self.workers)
        if not ready:
            return None
        worker = self.rng.choice(ready)
        pids = [worker.pid, *children_of(worker.pid)]
        t = time.time()
        os.killpg(worker.pid, signal.SIGSTOP)  # its own session: main and children alike
        kill = Kill(t, "stop", worker.name, pids)
        self.kills.append(kill)
        self.stopped = (worker, kill)
        return f"SIGSTOP {worker.name} (pids {pids}) for {self.pause_s:g} s"

    def _resume(self) -> str:
        assert self.stopped is not None
        worker, kill = self.stopped
        os.killpg(worker.pid, signal.SIGCONT)
        kill.until = time.time()
        self.stopped = None
        self.next_at = time.time() + self.rng.uniform(*self.gap_s)
        return f"SIGCONT {worker.name} after {kill.until - kill.t:.1f} s"

    def busy(self) -> bool:
        """A worker is still paused: the run does not end before it is woken."""
        return self.stopped is not None

    def finish(self) -> None:
        if self.stopped is not None:
            self._resume()


@dataclass
class Outage:
    what: str  # "store" or "broker"
    cut_at: float  # time.time()
    restored_at: float | None = None
    connections_reset: int = 0
    in_flight_at_restore: list[str] = field(default_factory=list)  # execution ids


class OutageInjector:
    """Cut `proxies` `start_after_s` into the run for `outage_s`, then restore them; once."""

    def __init__(self, what: str, proxies: list[TcpProxy], *, start_after_s: float,
                 outage_s: float) -> None:
        self.what = what
        self.proxies = proxies
        self.outage_s = outage_s
        self.cut_at = time.time() + start_after_s
        self.outage: Outage | None = None
        self.kills: list[Kill] = []  # none: resume times do not apply

    def tick(self) -> str | None:
        now = time.time()
        if self.outage is None and now >= self.cut_at:
            self.outage = Outage(self.what, now)
            self.outage.connections_reset = sum(p.cut() for p in self.proxies)
            return (f"{self.what} outage: proxy cut ({self.outage.connections_reset} "
                    f"connections reset) for {self.outage_s:g} s")
        if self.outage is not None and self.outage.restored_at is None \
                and now >= self.outage.cut_at + self.outage_s:
            return self._restore()
        return None

    def _restore(self) -> str:
        assert self.outage is not None
        for proxy in self.proxies:
            proxy.restore()
        self.outage.restored_at = time.time()
        return f"{self.what} back after {self.outage.restored_at - self.outage.cut_at:.1f} s"

    def busy(self) -> bool:
        """Not cut yet, or not restored yet: the run goes on until both happened."""
        return self.outage is None or self.outage.restored_at is None

    def finish(self) -> None:
        if self.outage is not None and self.outage.restored_at is None:
            self._restore()
