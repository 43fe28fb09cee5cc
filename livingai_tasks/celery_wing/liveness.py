"""A worker's liveness, renewed from its main process, and what it holds.

Every step's lease is renewed by the pool child running it; that says nothing about the
messages a worker has taken but not started (reserved behind a running step, prefetched,
waiting for an ETA): if the whole worker dies, Redis keeps them unacked for the visibility
timeout (an hour by default), and only the stuck-step timer would find their executions.
So the main process of each worker keeps one liveness record of its own, renewed on its own
thread (never queued behind data writes): its deadline, the lease-owner names of its
processes, and the executions of every message it holds. When that record expires, the
recovery tick resumes everything the worker held at once.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from celery.worker import state as worker_state

from ..settings import Settings
from ..stores import ListsWorkers, Store, TracksWorkers, open_store
from .messages import StepIdentity

__all__ = ["WorkerBeat", "worker_name", "owner_name"]

# How long a poke waits for more messages of the same burst before it beats.
_POKE_GATHER_S = 0.1

log = logging.getLogger("livingai_tasks.liveness")


def owner_name(pid: int | None = None) -> str:
    """The lease-owner name of a process: what its leases and its records carry."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def worker_name() -> str:
    """This worker's name in the liveness records: its main process's owner name."""
    return owner_name()


class WorkerBeat:
    """The liveness thread of one worker's main process."""

    def __init__(self, settings: Settings, consumer: Any, store: Store | None = None, *,
                 counters: Callable[[], dict[str, float]] | None = None) -> None:
        self.settings = settings
        # The worker's counters summed over its processes, sent with each beat to a store
        # that keeps them (ListsWorkers): what `livingai-tasks stats` sums over a fleet.
        self._counters = counters
        self._counters_failing = False
        self.consumer = consumer
        self.name = worker_name()
        self._store = store
        self._own_store = store is None
        self._stop = threading.Event()
        self._poked = threading.Event()
        # The executions the last record listed: a message of one of them (a chain's next
        # step taken by the worker that ran the previous one, most of the time) needs no
        # early beat, since the record already says the worker holds that execution.
        self._listed: frozenset[str] = frozenset()
        self._counted_at = 0.0  # time.monotonic() of the last beat that summed counters
        self._last_counters: dict[str, float] | None = None  # what it summed
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> bool:
        """Start beating; False (and nothing started) if the store keeps no liveness."""
        store = self._store or open_store(self.settings.store)
        if not isinstance(store, TracksWorkers):
            if self._own_store:
                store.close()
            return False
        self._store = store
        self.beat()  # at once: a worker that dies in its first seconds is found too
        self._thread = threading.Thread(target=self._loop, name="livingai-worker-beat",
                                        daemon=True)
        self._thread.start()
        return True

    def stop(self) -> None:
        """A clean shutdown: the record goes, so recovery does not take this worker's
        leftovers for a crash (Celery hands them back to the broker itself)."""
        self._stop.set()
        self._poked.set()
        if self._thread is not None:
            self._thread.join(5.0)
        store = self._store
        if isinstance(store, TracksWorkers):
            try:
                store.forget_worker(self.name)
            except Exception:  # noqa: BLE001 - at shutdown: the record expires anyway
                log.warning("livingai_tasks: could not remove worker %s's liveness record",
                            self.name)
        if self._own_store and store is not None:
            store.close()

    def holding(self) -> list[str]:
        """The executions of every message this worker holds: running, reserved, or
        waiting for an ETA (Celery's own registry of requests, in this process)."""
        found = set()
        for request in list(worker_state.requests.values()):
            identity = StepIdentity.from_headers(getattr(request, "request_dict", None) or {})
            if identity is not None:
                found.add(identity.execution_id)
        return sorted(found)

    def owners(self) -> list[str]:
        """The lease-owner names of this worker's processes: its pool children, and itself
        (a solo or threads pool runs steps in the main process)."""
        pids = {os.getpid()}
        pool = getattr(getattr(self.consumer, "controller", None), "pool", None)
        # Celery's prefork TaskPool wraps billiard's Pool, whose _pool lists the processes.
        processes = getattr(getattr(pool, "_pool", None), "_pool", None)
        for process in processes if isinstance(processes, list) else []:
            pid = getattr(process, "pid", None)
            if isinstance(pid, int):
                pids.add(pid)
        return [owner_name(pid) for pid in sorted(pids)]

    def beat(self, *, counters: bool = True) -> None:
        """Renew the record; `counters=False` (an early beat for a new message) sends the
        counters the last beat summed: summing them reads every process's snapshot, and
        they change little in a fraction of worker_beat_s."""
        store = self._store
        assert isinstance(store, TracksWorkers)
        extra: dict[str, Any] = {}
        if self._counters is not None and isinstance(store, ListsWorkers):
            if counters or self._last_counters is None:
                self._last_counters = self._read_counters()
                self._counted_at = time.monotonic()
            extra["counters"] = self._last_counters
        holding = self.holding()
        try:
            store.beat_worker(self.name, expires_at=time.time() + self.settings.worker_ttl_s,
                              owners=self.owners(), holding=holding, **extra)
        except Exception as exc:  # noqa: BLE001 - a liveness thread must never die
            if not self._failing:
                log.warning("livingai_tasks: worker %s could not renew its liveness (%s); "
                            "retrying", self.name, exc)
            self._failing = True
            return
        if self._failing:
            log.info("livingai_tasks: worker %s renews its liveness again", self.name)
        self._failing = False
        self._listed = frozenset(holding)

    def _read_counters(self) -> dict[str, float] | None:
        assert self._counters is not None
        try:
            counters = self._counters()
        except Exception:  # noqa: BLE001 - liveness matters more than the counters
            if not self._counters_failing:
                log.exception("livingai_tasks: worker %s could not sum its counters; its "
                              "liveness record goes without them", self.name)
            self._counters_failing = True
            return None
        self._counters_failing = False
        return counters

    def poke(self, execution_id: str | None = None) -> None:
        """The worker took a message (of `execution_id`, if known): beat soon, so that the
        record lists it before the next scheduled beat (a worker killed in between would
        otherwise hide it), unless the record lists that execution already."""
        if execution_id is None or execution_id not in self._listed:
            self._poked.set()

    def _loop(self) -> None:
        while not self._stop.is_set():
            poked = self._poked.wait(self.settings.worker_beat_s)
            if self._stop.is_set():
                return
            if poked:
                # A burst of messages makes one beat, not one each.
                self._stop.wait(_POKE_GATHER_S)
                self._poked.clear()
            due = time.monotonic() - self._counted_at >= self.settings.worker_beat_s
            self.beat(counters=due)
