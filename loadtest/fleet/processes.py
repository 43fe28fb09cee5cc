"""Real Celery worker and beat processes for the fleet and chaos workloads, one run's names
and its stores.

Every process runs in its own session (process group), so stopping one also stops the pool
children it forked, even when its main process was SIGKILLed and the children were orphaned.
Everything one run creates in Redis lives under one key prefix (`Namespace.prefix`): the
broker's queues and its unacked hash, Celery's results, our store and the side-effect
counters. Cleaning up is a SCAN of that prefix, never FLUSHALL.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import livingai_tasks as lai

from ..core.context import RunContext
from ..core.machine import ROOT
from ..core.servers import delete_keys
from ..core.stores import isolated

__all__ = ["Namespace", "Proc", "Fleet", "children_of", "wait_for", "migrated_store",
           "rss_bytes"]

# What a SIGKILLed pool child makes a surviving main process log: the chaos we caused.
EXPECTED_ERRORS = ("WorkerLostError", "exited with 'signal 9 (SIGKILL)'")


def children_of(pid: int) -> list[int]:
    """Direct child pids, read from /proc (no psutil needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # the command may contain spaces and parentheses: the fields follow the last ')'
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def rss_bytes(pid: int) -> int:
    """Resident memory of one process (VmRSS from /proc), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str,
             step_s: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(step_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")


@dataclass(frozen=True)
class Namespace:
    """One run's names: a key prefix that nothing else uses, under which live its broker
    queues, Celery's results, its stores and the steps' side-effect counters."""

    tag: str
    redis_url: str

    @property
    def prefix(self) -> str:  # [A-Za-z0-9_.-]+: also valid as our Redis store's prefix
        return f"lt-{self.tag}"

    def store_name(self, kind: str) -> str:
        """The name of this run's store of `kind` (core/stores.py): under the prefix."""
        return f"{self.prefix}-store-{kind}"

    def env(self) -> dict[str, str]:
        """What loadtest.fleet.app reads in every worker and beat process."""
        return {"LT_PREFIX": self.prefix, "LT_REDIS": self.redis_url}

    def cleanup(self) -> int:
        """Delete every Redis key of this run (broker, results, store, counters)."""
        return delete_keys(self.redis_url, f"{self.prefix}*")

    def drop_results(self) -> int:
        """Celery's stored results (~20 KB each): not needed once a batch is counted."""
        return delete_keys(self.redis_url, f"{self.prefix}-celery:celery-task-meta-*")


class Proc:
    """One worker or beat process, its log, and the ways it can die."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.args = args
        self.env = env
        self.log = log
        self.started_at = 0.0
        self.killed_at = 0.0  # time.time() of the last kill_main()
        self._log_from = 0
        self.popen: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start (or restart) the process, as a supervisor would."""
        self._log_from = self.log.stat().st_size if self.log.exists() else 0
        with open(self.log, "ab") as fh:
            self.popen = subprocess.Popen(self.args, env=self.env, cwd=ROOT, stdout=fh,
                                          stderr=subprocess.STDOUT, start_new_session=True)
        self.started_at = time.time()

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def text(self, *, since_start: bool = False) -> str:
        try:
            with open(self.log, "rb") as fh:
                if since_start:
                    fh.seek(self._log_from)
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def ready(self) -> bool:
        return self.alive() and "ready." in self.text(since_start=True)

    def kill_main(self) -> list[int]:
        """SIGKILL the main process only (its prefork children die with it: PDEATHSIG), as
        an OOM kill of the container or a lost node would. Returns the pids that died."""
        victims = [self.pid, *children_of(self.pid)]
        self.killed_at = time.time()  # after the /proc scan, which takes milliseconds
        os.kill(self.pid, signal.SIGKILL)
        assert self.popen is not None
        self.popen.wait(10)
        self._kill_group()  # a child that outlived its parent must not run on
        return victims

    def stop(self) -> None:
        if self.popen is None:
            return
        self._kill_group()
        with suppress(subprocess.TimeoutExpired):
            self.popen.wait(10)

    def _kill_group(self) -> None:
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


class Fleet:
    """Workers (and beat) of one Celery app module, started with one environment."""

    def __init__(self, logs: Path, env: dict[str, str], *, app: str = "loadtest.fleet.app",
                 loglevel: str = "WARNING", inherit_livingai: bool = True) -> None:
        self.logs = logs
        logs.mkdir(parents=True, exist_ok=True)
        self.app = app
        self.loglevel = loglevel
        # inherit_livingai=False: no LIVINGAI_* setting of the caller's shell reaches the
        # workers, only those in `env` (a run "at the library's defaults" means that).
        inherited = {k: v for k, v in os.environ.items()
                     if inherit_livingai or not k.startswith("LIVINGAI_")}
        self.env = {**inherited, "PYTHONPATH": str(ROOT), **env}
        self.procs: list[Proc] = []

    def worker(self, name: str, queues: list[str], *, concurrency: int = 1,
               extra_env: dict[str, str] | None = None) -> Proc:
        args = [sys.executable, "-m", "celery", "-A", self.app, "worker", "-P", "prefork",
                "-c", str(concurrency), "-n", f"{name}@%h", "-Q", ",".join(queues),
                "--without-mingle", "--without-gossip", "-l", self.loglevel]
        proc = Proc(name, args, {**self.env, **(extra_env or {})}, self.logs / f"{name}.log")
        self.procs.append(proc)
        return proc

    def beat(self) -> Proc:
        schedule = self.logs / "beat-schedule"
        args = [sys.executable, "-m", "celery", "-A", self.app, "beat", "-s", str(schedule),
                "-l", "INFO"]
        proc = Proc("beat", args, self.env, self.logs / "beat.log")
        self.procs.append(proc)
        return proc

    def wait_ready(self, procs: list[Proc] | None = None, timeout_s: float = 90) -> None:
        """Wait until each worker says 'ready.' (its log level must be INFO or lower for
        that line; at WARNING we wait for the pool children instead)."""
        for proc in procs or [p for p in self.procs if p.name != "beat"]:
            if self.loglevel in ("DEBUG", "INFO"):
                wait_for(lambda p=proc: p.ready() or not p.alive(), timeout_s,  # type: ignore[misc]
                         f"worker {proc.name} to be ready")
            else:
                wait_for(lambda p=proc: children_of(p.pid) or not p.alive(),  # type: ignore[misc]
                         timeout_s, f"worker {proc.name}'s pool")
                time.sleep(0.5)  # the consumer connects after the pool is up
            if not proc.alive():
                raise RuntimeError(f"worker {proc.name} exited:\n{proc.text()[-3000:]}")

    def stop(self) -> None:
        for proc in self.procs:
            proc.stop()

    def log_problems(self, limit: int = 20,
                     expected: tuple[str, ...] = EXPECTED_ERRORS) -> list[str]:
        """Log records (a line and its traceback) that show an error nobody asked for."""
        found: list[str] = []
        for proc in self.procs:
            record: list[str] = []
            for line in [*proc.text().splitlines(), "[end"]:
                if not line.startswith("[") and record:
                    record.append(line)
                    continue
                text = "\n".join(record)
                if any(k in text for k in ("Traceback", "ERROR", "CRITICAL")) \
                        and not any(e in text for e in expected) and len(found) < limit:
                    tail = f" ... {record[-1].strip()[:300]}" if len(record) > 1 else ""
                    found.append(f"{proc.log.name}: {record[0][:300]}{tail}")
                record = [line]
        return found


@contextmanager
def migrated_store(ctx: RunContext, ns: Namespace, kind: str) -> Iterator[str]:
    """The URL of an isolated store of `kind` (core/stores.py), migrated before any worker
    opens it (never done on import); removed on the way out."""
    with isolated(ctx.servers, kind, ns.store_name(kind), ctx.results_dir) as site:
        store = lai.open_store(site.url)
        try:
            store.migrate()
        finally:
            store.close()
        yield site.url
