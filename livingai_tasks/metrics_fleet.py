"""One worker's metrics summed over its processes: each process's snapshot in a folder.

A prefork worker records in every pool child (each has its own engine and `Metrics`), and
a child that dies (SIGKILL, OOM, max_tasks_per_child) would take its counts with it. So
each process of a worker writes its snapshot (JSON: counters, gauges, histogram buckets) to
the worker's folder, `<tempdir>/livingai-metrics-<uid>/<worker>/<pid>-<token>.json`, from
a thread of its own every `SNAPSHOT_INTERVAL_S` (1 s) when something changed, and once
more when it exits cleanly. The worker's main process reads the folder when it is scraped
or beats (`WorkerFolder.read()`): it sums every snapshot, and folds the snapshots of
processes that are gone into `retired.json`, so a dead child's counts stay in the sum
while the folder keeps one file per live process.

Why files and not the alternatives:
- prometheus_client's multiprocess mode keeps one mmap'd file per process and metric
  *type*, needs its own metric objects on the hot path (a second instrumentation beside
  `Metrics`) and an environment variable set before import; it has no notion of a child
  that died (its files stay for ever unless the caller removes them) nor a way to hand the
  sum to the liveness record.
- A pipe or socket to the main process costs every process a connection and the main
  process a reader; a child dying mid-message loses more than a file written atomically.
A save never pays any of this: it only bumps the in-memory counter, as before; the writer
thread copies the snapshot (one lock acquisition) and writes a few KB at most once a
second. What a SIGKILLed child can lose: what it counted in its last second.

Counters and histograms are summed over every process the folder has seen since the
worker started (a new worker starts from zero, as a restarted process does in Prometheus).
Gauges are summed over the live processes only: each gauge here is an amount a process
holds (writes queued, cache entries and bytes, spill bytes), which a dead process no longer
holds (its spill files are claimed, and then reported, by a live process).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .metrics import BUCKET_BOUNDS_MS, Metrics, _Histogram
from .metrics_catalogue import declare_catalogue

__all__ = ["SNAPSHOT_INTERVAL_S", "snapshot", "merge", "to_metrics", "SnapshotWriter",
           "WorkerFolder", "worker_folder", "metrics_root"]

log = logging.getLogger("livingai_tasks.metrics_fleet")

SNAPSHOT_INTERVAL_S = 1.0
_RETIRED = "retired.json"
Snapshot = dict[str, Any]


def metrics_root() -> Path:
    """<tempdir>/livingai-metrics-<uid>: one per user, like the spill folder's default."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return Path(tempfile.gettempdir()) / f"livingai-metrics-{uid}"


def worker_folder(worker: str, root: Path | None = None) -> Path:
    """The folder of the worker named `worker` ("host:pid" of its main process)."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in worker)
    return (root or metrics_root()) / safe


def snapshot(metrics: Metrics) -> Snapshot:
    """`metrics` as JSON-able values, with every histogram bucket (so snapshots can be
    summed exactly, which percentiles could not be)."""
    counters, gauges, hists = metrics._snapshot()  # one lock acquisition, copies
    return {
        "counters": counters,
        "gauges": gauges,
        "histograms": {name: {"counts": h.counts, "count": h.count, "sum": h.sum,
                              "min": h.min if h.count else None, "max": h.max}
                       for name, h in hists.items()},
    }


def _empty() -> Snapshot:
    return {"counters": {}, "gauges": {}, "histograms": {}}


def merge(snapshots: Iterable[Snapshot], *, gauges: bool = True) -> Snapshot:
    """The sum of `snapshots`: counters and gauges added by name, histograms bucket by
    bucket (min of mins, max of maxes). `gauges=False` leaves gauges out (a retired sum).
    A histogram with another bucket layout (a snapshot from another version) is skipped."""
    total = _empty()
    for snap in snapshots:
        for name, value in snap.get("counters", {}).items():
            total["counters"][name] = total["counters"].get(name, 0) + value
        if gauges:
            for name, value in snap.get("gauges", {}).items():
                total["gauges"][name] = total["gauges"].get(name, 0) + value
        for name, h in snap.get("histograms", {}).items():
            if len(h["counts"]) != len(BUCKET_BOUNDS_MS) + 1:
                continue
            into = total["histograms"].get(name)
            if into is None:
                total["histograms"][name] = {**h, "counts": list(h["counts"])}
                continue
            into["counts"] = [a + b for a, b in zip(into["counts"], h["counts"], strict=True)]
            into["count"] += h["count"]
            into["sum"] += h["sum"]
            mins = [m for m in (into["min"], h["min"]) if m is not None]
            into["min"] = min(mins) if mins else None
            into["max"] = max(into["max"], h["max"])
    return total


def to_metrics(total: Snapshot) -> Metrics:
    """A Metrics holding `total` (with the catalogue's HELP texts), to export as text."""
    metrics = Metrics()
    declare_catalogue(metrics)
    for name, value in total["counters"].items():
        metrics.incr(name, value)
    for name, value in total["gauges"].items():
        metrics.set_gauge(name, value)
    # Histograms are restored bucket by bucket: Metrics has no public way to take counts
    # that were observed elsewhere (observe() takes one value at a time).
    with metrics._lock:
        for name, h in total["histograms"].items():
            metrics._histograms[name] = _Histogram(
                list(h["counts"]), int(h["count"]), float(h["sum"]),
                float("inf") if h["min"] is None else float(h["min"]), float(h["max"]))
    return metrics


def _write_atomically(path: Path, text: str) -> None:
    # A reader sees the old file or the new one, never half of one (rename is atomic).
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    if pid <= 0:  # kill(0, ...) would address our own process group
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process has that pid now: not ours
        return False
    return True


class SnapshotWriter:
    """This process's snapshot file in a worker's folder, rewritten by a daemon thread
    every `interval_s` when it changed, and by `write_now()` (at exit)."""

    def __init__(self, folder: Path, read: Callable[[], Metrics | None],
                 interval_s: float = SNAPSHOT_INTERVAL_S) -> None:
        self.folder = folder
        self.pid = os.getpid()
        # A token as well as the pid: a pid the OS reuses must not name a file the main
        # process already folded into retired.json.
        self.path = folder / f"{self.pid}-{secrets.token_hex(4)}.json"
        self._read = read
        self._interval_s = interval_s
        self._last = ""
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._warned = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="livingai-metrics-snapshot",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Write a last time and stop the thread."""
        self._stop.set()
        self.write_now()

    def write_now(self) -> None:
        metrics = self._read()
        if metrics is None or os.getpid() != self.pid:
            return
        text = json.dumps({"pid": self.pid, **snapshot(metrics)}, separators=(",", ":"))
        with self._lock:
            if text == self._last:
                return
            try:
                self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
                _write_atomically(self.path, text)
            except OSError as exc:
                if not self._warned:
                    self._warned = True
                    log.warning("livingai_tasks: cannot write metrics snapshot %s (%s); this "
                                "process's counters are missing from its worker's sum",
                                self.path, exc)
                return
            self._last = text

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.write_now()
            except Exception:  # noqa: BLE001 - the thread must not die on a bad value
                log.exception("livingai_tasks: metrics snapshot failed")


class WorkerFolder:
    """The main process's view of its worker's folder: prepare() at start, read() to sum."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock = threading.Lock()  # the scrape and the liveness beat both read

    def prepare(self) -> None:
        """Empty the folder (a new worker counts from zero; in a container, the main
        process's pid, and so the folder's name, is the same at every restart), and remove
        the folders of this host's workers whose main process is gone."""
        for sibling in self.folder.parent.glob("*") if self.folder.parent.is_dir() else ():
            pid = sibling.name.rsplit("_", 1)[-1]
            if sibling != self.folder and pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(sibling, ignore_errors=True)
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)

    def read(self) -> Snapshot:
        """The sum over every process of the worker (see the module docstring)."""
        with self._lock:
            retired = self._load(self.folder / _RETIRED) or {"folded": [], **_empty()}
            folded = set(retired["folded"])
            live: list[tuple[Path, Snapshot]] = []
            dead: list[tuple[Path, Snapshot]] = []
            for path in sorted(self.folder.glob("*.json")):
                if path.name == _RETIRED:
                    continue
                if path.name in folded:  # folded, then the unlink was cut short
                    path.unlink(missing_ok=True)
                    continue
                snap = self._load(path)
                if snap is None:
                    continue
                (live if _alive(int(snap.get("pid", 0))) else dead).append((path, snap))
            if dead:
                retired = {"folded": [p.name for p, _ in dead],
                           **merge([retired, *(s for _, s in dead)], gauges=False)}
                try:
                    _write_atomically(self.folder / _RETIRED, json.dumps(retired))
                    for path, _ in dead:
                        path.unlink(missing_ok=True)
                except OSError as exc:
                    log.warning("livingai_tasks: cannot fold dead processes' metrics in %s "
                                "(%s)", self.folder, exc)
            return merge([{**retired, "gauges": {}}, *(s for _, s in live)])

    @staticmethod
    def _load(path: Path) -> Snapshot | None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("livingai_tasks: skipping unreadable metrics snapshot %s (%s)",
                        path, exc)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        return data if isinstance(data, dict) else None
