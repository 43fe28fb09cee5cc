"""Real Celery worker and beat processes for tests: started, waited for, and killed for real.

Each Fleet has its own queue, counter prefix and store, so tests do not see each other's
messages or side effects.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import redis

from loadtest.fleet.processes import children_of, wait_for  # noqa: F401 - the tests use them from here

ROOT = Path(__file__).resolve().parent.parent


class Proc:
    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        self._fh = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(args, env=env, cwd=ROOT, stdout=self._fh,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def kill_group(self) -> None:
        """SIGKILL the worker and its pool children at once: nothing of it records anything."""
        os.killpg(self.pid, signal.SIGKILL)
        self.popen.wait(10)

    def kill(self) -> None:
        """SIGKILL the main process only, as an OOM killer or a lost node would."""
        os.kill(self.pid, signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.popen.wait(10)
        else:
            # orphaned pool children, if any, share the session's group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self._fh.close()


class Fleet:
    """Workers and beat for one test, on their own queue, counters and store."""

    def __init__(self, tmp: Path, store_url: str, *, broker: str, redis_url: str,
                 lease_s: float = 3.0, recovery_interval_s: float = 1.0,
                 stuck_after_s: float = 5.0, max_attempts: int = 3,
                 extra_env: dict[str, str] | None = None) -> None:
        self.tmp = tmp
        self.tag = uuid.uuid4().hex[:10]
        self.queue = f"lai-test-{self.tag}"
        self.counters = f"laitest-counters-{self.tag}"
        self.redis = redis.Redis.from_url(redis_url)
        # where queued messages live, when the broker is Redis (a list per queue)
        self.broker = redis.Redis.from_url(broker) if broker.startswith("redis") else None
        # The test process publishes with these too: start() sets the first lease from them.
        self.settings = {"lease_s": lease_s, "recovery_interval_s": recovery_interval_s,
                         "stuck_after_s": stuck_after_s, "max_attempts": max_attempts}
        self.env = {
            **os.environ,
            "LIVINGAI_STORE": store_url,
            "LIVINGAI_LEASE_S": str(lease_s),
            "LIVINGAI_HEARTBEAT_S": str(max(lease_s / 4, 0.2)),
            "LIVINGAI_RECOVERY_INTERVAL_S": str(recovery_interval_s),
            "LIVINGAI_STUCK_AFTER_S": str(stuck_after_s),
            "LIVINGAI_MAX_ATTEMPTS": str(max_attempts),
            "LAI_TEST_BROKER": broker,
            "LAI_TEST_BACKEND": redis_url,
            "LAI_TEST_QUEUE": self.queue,
            "LAI_TEST_COUNTERS": self.counters,
            "LIVINGAI_TEST_REDIS": redis_url,
            "PYTHONPATH": str(ROOT),
            **(extra_env or {}),
        }
        self.procs: list[Proc] = []

    def worker(self, name: str, concurrency: int = 1, *, wait: bool = True,
               extra: tuple[str, ...] = ()) -> Proc:
        args = [sys.executable, "-m", "celery", "-A", "tests.agent_app", "worker",
                "-n", f"{name}-{self.tag}@%h", "-c", str(concurrency), "-P", "prefork",
                "-Q", self.queue, "--without-mingle", "--without-gossip", "-l", "INFO", *extra]
        proc = Proc(args, self.env, self.tmp / f"{name}.log")
        self.procs.append(proc)
        if wait:
            wait_for(lambda: "ready." in proc.text() or proc.popen.poll() is not None, 60,
                     f"worker {name} to be ready")
            assert proc.popen.poll() is None, f"worker {name} exited:\n{proc.text()[-3000:]}"
            wait_for(lambda: len(children_of(proc.pid)) >= concurrency, 20, "pool children")
        return proc

    def beat(self) -> Proc:
        args = [sys.executable, "-m", "celery", "-A", "tests.agent_app", "beat",
                "-s", str(self.tmp / "beat-schedule"), "-l", "INFO"]
        proc = Proc(args, self.env, self.tmp / "beat.log")
        self.procs.append(proc)
        return proc

    def count(self, name: str) -> int:
        return int(self.redis.get(f"{self.counters}:{name}") or 0)

    def pause(self, step: str) -> None:
        self.redis.set(f"{self.counters}:pause:{step}", 1, ex=120)

    def unpause(self, step: str) -> None:
        self.redis.delete(f"{self.counters}:pause:{step}")

    def close(self) -> None:
        for proc in self.procs:
            proc.stop()
        for key in self.redis.scan_iter(match=f"{self.counters}:*", count=1000):
            self.redis.delete(key)
        self.redis.close()
        if self.broker is not None:
            self.broker.delete(self.queue)
            self.broker.close()

    def logs(self) -> str:
        return "\n".join(f"===== {p.log.name}\n{p.text()[-4000:]}" for p in self.procs)


# Brokers' keys live in their own Redis database, apart from the stores' prefixes.
REDIS_URL = os.environ.get("LIVINGAI_TEST_REDIS", "redis://127.0.0.1:6379/0")
BROKER_DB = REDIS_URL.rsplit("/", 1)[0] + "/3"


def make_fleet(tmp_path: Path, store_url: str, broker: str = BROKER_DB, **kw: Any) -> Fleet:
    """A Fleet, and the test process's copy of tests.agent_app pointed at the same broker,
    queue and store (the test publishes with it)."""
    import livingai_tasks as lai
    from tests import agent_app

    fleet = Fleet(tmp_path, store_url, broker=broker, redis_url=REDIS_URL, **kw)
    if agent_app.app.conf.broker_url != broker:
        # Celery caches its connection and producer pools per app: drop both.
        agent_app.app.close()
        agent_app.app.amqp._producer_pool = None
        agent_app.app.conf.broker_url = broker
    agent_app.app.conf.task_default_queue = fleet.queue
    agent_app.COUNTERS = fleet.counters
    lai.install(agent_app.app, store=store_url, **fleet.settings)
    return fleet


def store() -> Any:
    """The store the test process's runtime writes to (the fleet's)."""
    from livingai_tasks.celery_wing import runtime

    return runtime.get().engine.store


def execution_status(eid: str) -> Any:
    ex = store().get_execution(eid)
    return ex.status if ex else None


def fleet_store_url(request: Any, kind: str) -> str:
    """A store of this test's own for a fleet: a Redis prefix, or a migrated PostgreSQL
    schema (from the redis_prefix and pg_schema fixtures, dropped afterwards)."""
    import livingai_tasks as lai

    if kind == "redis":
        return f"{REDIS_URL}?prefix={request.getfixturevalue('redis_prefix')}"
    from tests.conftest import pg_url

    url = pg_url(request.getfixturevalue("pg_schema"))
    s = lai.open_store(url)
    s.migrate()
    s.close()
    return url


def wait_status(fleet: Fleet, eid: str, status: Any, timeout: float = 60) -> None:
    """Wait for an execution's status; on a timeout, print what the fleet and store say."""
    try:
        wait_for(lambda: execution_status(eid) is status, timeout, status.value)
    except AssertionError:
        print(fleet.logs())
        print(store().get_execution(eid))
        for n in store().nodes(eid):
            print(n.id, [(v.status, v.metadata.get("fence")) for v in store().node_versions(n.id)])
        raise


def step_node(eid: str) -> Any:
    """The one step of an execution: not a journaled call, nor a mailbox entry."""
    from livingai_tasks.journal import is_call
    from livingai_tasks.nodes import Meta

    [step] = [n for n in store().nodes(eid) if not is_call(n) and Meta.EVENT not in n.metadata]
    return step
