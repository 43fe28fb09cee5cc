"""Which process of a Celery worker does what for the worker's summed metrics
(livingai_tasks.metrics_fleet), and when:

    worker_init (main process, before the pool forks)   empties the worker's folder, binds
                                                        /metrics if metrics_port is set,
                                                        starts its own snapshot writer
    worker_process_init (each pool child)               starts its snapshot writer
    worker_process_shutdown (a child exiting cleanly)   writes its last snapshot
    each liveness beat (main process)                   sends the summed counters along
    worker_shutdown (main process)                      last snapshot, endpoint closed
"""

from __future__ import annotations

import logging
import os

from ..metrics import Metrics
from ..metrics_fleet import SnapshotWriter, WorkerFolder, to_metrics, worker_folder
from ..metrics_http import MetricsServer
from ..settings import Settings
from . import runtime
from .liveness import owner_name

__all__ = ["start_worker", "start_child", "stop_process", "counters"]

log = logging.getLogger("livingai_tasks.worker_metrics")

_writer: list[SnapshotWriter] = []  # this process's (a child inherits its parent's: replaced)
_folder: list[WorkerFolder] = []  # the main process's
_server: list[MetricsServer] = []


class _Reader:
    """This process's Metrics for the writer: the runtime's engine's, once built. It keeps
    the last one it saw, so the last snapshot, written after the runtime closed its engine
    at shutdown, still has the counts of that engine's last writes."""

    def __init__(self) -> None:
        self._seen: Metrics | None = None

    def __call__(self) -> Metrics | None:
        current = runtime.get().metrics_if_built() if runtime.is_configured() else None
        if current is not None:
            self._seen = current
        return self._seen


def _start_writer(worker: str) -> None:
    writer = SnapshotWriter(worker_folder(worker), _Reader())
    _writer[:] = [writer]
    writer.start()


def start_worker(settings: Settings) -> None:
    """In the main process at worker_init. ConfigError if the endpoint cannot listen."""
    folder = WorkerFolder(worker_folder(owner_name()))
    try:
        folder.prepare()
    except OSError as exc:  # the steps matter more than their counters
        log.warning("livingai_tasks: cannot prepare the metrics folder %s (%s); this "
                    "worker's processes will not be summed", folder.folder, exc)
    _folder[:] = [folder]
    if settings.metrics_port:
        server = MetricsServer(settings.metrics_bind, settings.metrics_port,
                               lambda: to_metrics(folder.read()).prometheus_text())
        _server[:] = [server]
        log.info("livingai_tasks: this worker's metrics (all its processes) at "
                 "http://%s:%d/metrics", settings.metrics_bind, server.port)
    _start_writer(owner_name())


def start_child() -> None:
    """In a pool child at worker_process_init: its worker is its parent. The child drops
    what it inherited of the main process's endpoint: the listening socket (only closed,
    since no thread serves it here), so that it never holds the port."""
    while _server:
        _server.pop().forget_after_fork()
    _folder.clear()
    _start_writer(owner_name(os.getppid()))


def stop_process() -> None:
    """A clean exit (a child's, or the main process's): the last snapshot, and the
    endpoint closed. A SIGKILL skips this: the process loses its last second."""
    for writer in _writer:
        writer.stop()
    while _server:
        _server.pop().close()


def counters() -> dict[str, float]:
    """The worker's counters summed over its processes, zeros left out (the liveness
    record stays small). Main process only."""
    if not _folder:
        return {}
    return {k: v for k, v in _folder[0].read()["counters"].items() if v}
