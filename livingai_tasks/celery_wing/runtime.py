"""The per-process runtime: settings, the checkpoint engine, and the lease heartbeat.

One per process. Built lazily on first use and rebuilt after fork (Celery's prefork
children call `after_fork()` from worker_process_init), so no connection or thread is ever
shared between a parent and a child.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Any

from ..engine import CheckpointEngine
from ..errors import ConfigError, StoreUnavailableError
from ..metrics import Metrics
from ..settings import Settings
from ..stores import Store, open_store

__all__ = ["Runtime", "configure", "get", "is_configured"]

log = logging.getLogger("livingai_tasks.runtime")


class Heartbeat:
    """One light thread per process that pushes forward the lease of every execution that
    has a step running here. A process that dies stops renewing; that is the orphan signal."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime
        # execution id -> [steps running here, the fence they run under]
        self._running: dict[str, list[int]] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def add(self, execution_id: str, fence: int = 0) -> None:
        with self._lock:
            entry = self._running.setdefault(execution_id, [0, fence])
            entry[0] += 1
            entry[1] = max(entry[1], fence)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="livingai-heartbeat",
                                                daemon=True)
                self._thread.start()

    def remove(self, execution_id: str) -> None:
        with self._lock:
            entry = self._running.get(execution_id)
            if entry is not None:
                entry[0] -= 1
                if entry[0] <= 0:
                    del self._running[execution_id]

    def running(self) -> dict[str, int]:
        """The executions with a step running here, and the fence each runs under."""
        with self._lock:
            return {eid: fence for eid, (_, fence) in self._running.items()}

    def _loop(self) -> None:
        settings = self._runtime.settings
        while not self._wake.wait(settings.heartbeat_s):
            ids = self.running()
            if not ids:
                continue
            deadline = time.time() + settings.lease_s
            for execution_id, fence in ids.items():
                try:
                    # Never renews a lease recovery has taken over (the fence moved on).
                    self._runtime.engine.update_execution(
                        execution_id, wait=False, lease_deadline=deadline,
                        lease_owner=self._runtime.owner, if_fence=fence, priority=True)
                except Exception:  # noqa: BLE001 - a heartbeat must never die
                    log.exception("livingai_tasks: lease renewal of %s failed", execution_id)

    def stop(self) -> None:
        self._wake.set()


class Runtime:
    def __init__(self, settings: Settings, app: Any = None, store: Store | None = None) -> None:
        self.settings = settings
        self.app = app  # the Celery app install() wired; recovery and resolve publish on it
        # A store handed to install() as an instance, used as it is in every process (it
        # must then be fork-safe); else each process opens its own from the URL.
        self.store_instance = store
        self.pid = os.getpid()
        self.owner = f"{socket.gethostname()}:{self.pid}"
        # The worker this process serves (its liveness record): itself, until a pool child
        # learns its parent's (worker_process_init).
        self.worker = self.owner
        self._engine: CheckpointEngine | None = None
        self._lock = threading.Lock()
        self.heartbeat = Heartbeat(self)

    @property
    def engine(self) -> CheckpointEngine:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    s = self.settings
                    store = self.store_instance or open_store(s.store)
                    self._engine = CheckpointEngine.from_settings(store, s)
        return self._engine

    def metrics_if_built(self) -> Metrics | None:
        """The engine's metrics, or None before the engine is built (reading them must not
        open a store connection, e.g. in a worker's main process before it forks)."""
        engine = self._engine
        return None if engine is None else engine.metrics

    def wait_for_store(self, *, log_every_s: float = 30.0) -> None:
        """Block until the store answers (a worker starting must not take step messages it
        cannot record: they stay in the broker meanwhile). Says so loudly while it waits."""
        store = self.store_instance or open_store(self.settings.store)
        started = time.monotonic()
        last_log: float | None = None
        pause = 0.5
        try:
            while True:
                try:
                    store.get_execution("livingai-tasks-reachability-probe")
                except StoreUnavailableError as exc:
                    now = time.monotonic()
                    if last_log is None or now - last_log >= log_every_s:
                        log.critical("livingai_tasks: store %s unreachable (%s); this worker "
                                     "takes no step until it answers (waiting %.0f s so far)",
                                     store.url, exc, now - started)
                        last_log = now
                    time.sleep(pause)
                    pause = min(pause * 2, 5.0)
                    continue
                if time.monotonic() - started > 1.0:
                    log.warning("livingai_tasks: store %s answers again after %.0f s; the "
                                "worker starts", store.url, time.monotonic() - started)
                return
        finally:
            if self.store_instance is None:
                store.close()

    def flush(self, timeout_s: float = 10.0) -> bool:
        if self._engine is None:
            return True
        return self._engine.flush(timeout_s)

    def close(self, timeout_s: float = 10.0) -> None:
        self.heartbeat.stop()
        if self._engine is not None:
            self._engine.close(timeout_s)
            if self.store_instance is None:  # else its owner closes it
                self._engine.store.close()
            self._engine = None


_current: Runtime | None = None
_current_lock = threading.Lock()


def configure(settings: Settings, app: Any = None, store: Store | None = None) -> Runtime:
    """Make `settings` this process's runtime (replacing, and closing, an earlier one)."""
    global _current
    with _current_lock:
        old, _current = _current, Runtime(settings, app, store)
    if old is not None and old.pid == os.getpid():
        old.close(timeout_s=5.0)
    return _current


def after_fork() -> None:
    """In a forked child: a fresh runtime with the same settings, sharing nothing."""
    global _current
    if _current is not None and _current.pid != os.getpid():
        _current = Runtime(_current.settings, _current.app, _current.store_instance)


def is_configured() -> bool:
    return _current is not None


def get() -> Runtime:
    if _current is None:
        raise ConfigError(
            "livingai_tasks is not installed in this process: call "
            "livingai_tasks.install(app, store=...) where the Celery app is defined."
        )
    if _current.pid != os.getpid():
        after_fork()
    return _current
