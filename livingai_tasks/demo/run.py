"""`livingai-tasks demo`: a local fleet runs the example agent, one worker is SIGKILLed
mid-step, and the executions resume and complete. Needs nothing but Python: by default the
broker is kombu's SQLAlchemy transport on a SQLite file and the store is SQLite.

What it shows, as it happens: every step starting and finishing, the kill, recovery
noticing the orphan and publishing the step again, and a closing table that proves each
card was charged exactly once (counted in the ledger, not in our own records).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from ..nodes import ExecutionNode, ExecutionStatus, Meta, Status, utcnow
from ..stores import mask_url, open_store

__all__ = ["DemoConfig", "DemoSummary", "run_demo"]

GOALS = ["book a flight to Lisbon", "renew the team's licences", "order a birthday cake",
         "reserve a meeting room", "buy a train ticket", "pay the electricity bill",
         "book a hotel in Kyoto", "order office chairs"]
_FINAL = {ExecutionStatus.COMPLETED, ExecutionStatus.FAILED, ExecutionStatus.IN_DOUBT,
          ExecutionStatus.CANCELLED}


@dataclass
class DemoConfig:
    executions: int = 6
    workers: int = 2
    broker: str | None = None
    store: str | None = None
    workdir: str | None = None
    step_s: float = 0.6
    timeout_s: float = 180.0
    lease_s: float = 3.0
    json_out: bool = False


@dataclass
class DemoSummary:
    completed: int = 0
    total: int = 0
    charges: dict[str, int] = field(default_factory=dict)
    resumed: dict[str, float] = field(default_factory=dict)  # execution -> s from kill
    killed_worker: str | None = None
    statuses: dict[str, str] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def charged_once(self) -> bool:
        return all(self.charges.get(eid, 0) == 1 for eid in self.statuses)

    @property
    def ok(self) -> bool:
        return self.completed == self.total and self.charged_once

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "completed": self.completed, "total": self.total,
                "charged_exactly_once": self.charged_once, "charges": self.charges,
                "resume_s": self.resumed, "killed_worker": self.killed_worker,
                "statuses": self.statuses, "elapsed_s": round(self.elapsed_s, 2)}


class _Fleet:
    """The demo's worker and beat processes, each in its own session so none outlives us."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir, self.env = workdir, env
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen([sys.executable, "-m", "celery", "-A", "livingai_tasks.demo.app",
                                 *args], env=self.env, cwd=self.workdir, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        self.procs[name] = proc
        return proc

    def worker(self, name: str) -> None:
        self._spawn(name, ["worker", "-n", f"{name}@%h", "-c", "1", "-Q",
                           self.env["LIVINGAI_QUEUE"], "--without-mingle", "--without-gossip",
                           "-l", "INFO"])

    def recovery_worker(self) -> None:
        """A small worker for recovery ticks only, so they never queue behind steps."""
        self._spawn("recovery", ["worker", "-n", "recovery@%h", "-c", "1", "-Q",
                                 self.env["LIVINGAI_RECOVERY_QUEUE"], "--without-mingle",
                                 "--without-gossip", "-l", "INFO"])

    def beat(self) -> None:
        self._spawn("beat", ["beat", "-s", str(self.workdir / "beat-schedule"), "-l", "INFO"])

    def ready(self, name: str) -> bool:
        path = self.workdir / f"{name}.log"
        return path.exists() and "ready." in path.read_text(errors="replace")

    def pool_pids(self, name: str) -> set[int]:
        """The pids of a worker's pool children (their pid is in each node's owner)."""
        parent = self.procs[name].pid
        found = set()
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    stat = (entry / "stat").read_text()
                except OSError:
                    continue
                if int(stat[stat.rindex(")") + 2:].split()[1]) == parent:
                    found.add(int(entry.name))
        return found

    def kill(self, name: str) -> None:
        os.kill(self.procs[name].pid, signal.SIGKILL)
        self.procs[name].wait(10)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(deadline - time.monotonic(), 0.1))
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # and any pool child left behind


class _Printer:
    """Event lines as they happen: readable on a terminal and in a CI log alike."""

    def __init__(self, out: TextIO, started: float, quiet: bool) -> None:
        self.out, self.started, self.quiet = out, started, quiet
        self.short: dict[str, str] = {}

    def name(self, eid: str) -> str:
        return self.short.setdefault(eid, f"run {len(self.short) + 1}")

    def __call__(self, text: str) -> None:
        if not self.quiet:
            print(f"[{time.monotonic() - self.started:6.1f}s] {text}", file=self.out, flush=True)


def _prepare(config: DemoConfig) -> tuple[Path, dict[str, str], str]:
    workdir = Path(config.workdir or "livingai-demo").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in ("broker.db", "results.db", "store.db", "ledger.db", "beat-schedule"):
        for path in workdir.glob(stale + "*"):
            path.unlink()
    store = config.store or f"sqlite:///{workdir / 'store.db'}"
    tag = uuid.uuid4().hex[:8]
    env = {**os.environ,
           "LIVINGAI_BROKER": config.broker or f"sqla+sqlite:///{workdir / 'broker.db'}",
           "LIVINGAI_BACKEND": os.environ.get("LIVINGAI_BACKEND",
                                              f"db+sqlite:///{workdir / 'results.db'}"),
           "LIVINGAI_STORE": store,
           "LIVINGAI_DEMO_LEDGER": os.environ.get("LIVINGAI_DEMO_LEDGER",
                                                  f"sqlite:///{workdir / 'ledger.db'}"),
           "LIVINGAI_DEMO_STEP_S": str(config.step_s),
           "LIVINGAI_LEASE_S": str(config.lease_s),
           "LIVINGAI_HEARTBEAT_S": str(config.lease_s / 3),
           "LIVINGAI_RECOVERY_INTERVAL_S": "1",
           "LIVINGAI_STUCK_AFTER_S": str(max(5.0, config.step_s * 6)),
           "LIVINGAI_QUEUE": f"livingai-demo-{tag}",
           "LIVINGAI_RECOVERY_QUEUE": f"livingai-demo-{tag}-recovery",
           "PYTHONUNBUFFERED": "1"}
    return workdir, env, store


def run_demo(config: DemoConfig, out: TextIO = sys.stdout) -> DemoSummary:
    """Run the demo end to end; the summary says whether every execution completed with its
    card charged exactly once."""
    started = time.monotonic()
    workdir, env, store_url = _prepare(config)
    os.environ.update({k: v for k, v in env.items() if k.startswith("LIVINGAI_")})
    say = _Printer(out, started, config.json_out)
    say(f"workdir {workdir}")
    say(f"broker {mask_url(env['LIVINGAI_BROKER'])}  store {mask_url(store_url)}")
    store = open_store(store_url)
    store.migrate()
    _declare_queues(env)
    fleet = _Fleet(workdir, env)
    summary = DemoSummary(total=config.executions)
    try:
        names = [f"worker{i + 1}" for i in range(config.workers)]
        for name in names:
            fleet.worker(name)
        fleet.recovery_worker()
        fleet.beat()
        _wait(lambda: all(fleet.ready(n) for n in [*names, "recovery"]), 60,
              "the workers to start", fleet)
        say(f"{config.workers} workers, a recovery worker and beat are up (lease "
            f"{config.lease_s:g} s, recovery every 1 s)")
        run_ids = _start_executions(config, say)
        _watch(config, store, fleet, names, run_ids, summary, say, started)
    finally:
        fleet.stop()
        store.close()
    from .ledger import Ledger

    summary.charges = {eid: n for eid, n in Ledger(env["LIVINGAI_DEMO_LEDGER"]).counts().items()
                       if eid in summary.statuses}
    summary.elapsed_s = time.monotonic() - started
    _report(summary, say, out, config.json_out)
    return summary


def _declare_queues(env: dict[str, str]) -> None:
    """Declare the demo's queues once, here: kombu's SQLite transport inserts a queue row on
    first declaration, and workers starting together race on it (UNIQUE constraint failed:
    kombu_queue.name, and the loser exits)."""
    from kombu.connection import Connection

    with Connection(env["LIVINGAI_BROKER"]) as conn:  # type: ignore[no-untyped-call]
        for name in (env["LIVINGAI_QUEUE"], env["LIVINGAI_RECOVERY_QUEUE"]):
            conn.SimpleQueue(name).close()


def _wait(predicate: Any, timeout: float, what: str, fleet: _Fleet) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        dead = [n for n, p in fleet.procs.items() if p.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"timed out after {timeout:g} s"
            raise RuntimeError(f"demo: waiting for {what}: {why}; see the logs in "
                               f"{fleet.workdir}")
        time.sleep(0.1)


def _start_executions(config: DemoConfig, say: _Printer) -> list[str]:
    from .. import start
    from .agent import agent_run, make_app

    make_app()  # this process publishes too: the same app config, and install() here
    ids = []
    for i in range(config.executions):
        goal = GOALS[i % len(GOALS)]
        run = start(agent_run(goal), metadata={"goal": goal})
        ids.append(run.execution_id)
        say(f"{say.name(run.execution_id)} started: {goal!r}  ({run.execution_id})")
        time.sleep(config.step_s / 2)  # staggered, so the kill lands on different steps
    return ids


def _watch(config: DemoConfig, store: Any, fleet: _Fleet, names: list[str], run_ids: list[str],
           summary: DemoSummary, say: _Printer, started: float) -> None:
    seen: dict[str, tuple[str, int]] = {}
    kill_at: float | None = None
    victim: str | None = None
    deadline = started + config.timeout_s
    watching = time.monotonic()
    while time.monotonic() < deadline:
        running = []
        for eid in run_ids:
            for node in store.nodes(eid):
                _note_node(node, seen, say, kill_at, summary)
                if node.status is Status.RUNNING:
                    running.append(node)
        if victim is None:
            # Aim at a card charge, the step recovery must not guess about, caught early in
            # its body so the kill lands mid-step (a RUNNING record read late may belong to
            # a body that has already returned: recovery would then have nothing to
            # resume). Any later step will do if no charge is caught in time; any age after that.
            waited = time.monotonic() - watching
            victim = _pick_victim(fleet, names, running, say,
                                  charge_only=waited < 10 * config.step_s + 3,
                                  young_s=config.step_s / 4 if waited < 20 * config.step_s + 6
                                  else None)
            if victim is not None:
                kill_at = time.time()
                summary.killed_worker = victim
                fleet.kill(victim)
                say(f"SIGKILL {victim} (pid {fleet.procs[victim].pid}) mid-step: its step "
                    "is lost to Celery; recovery will notice its lease expire")
        statuses = {eid: (ex.status if (ex := store.get_execution(eid)) else None)
                    for eid in run_ids}
        for eid, status in statuses.items():
            if status is not None and summary.statuses.get(eid) != status.value:
                summary.statuses[eid] = status.value
                if status in _FINAL:
                    say(f"{say.name(eid)} {status.value}")
        if all(s in _FINAL for s in statuses.values()):
            break
        time.sleep(0.2 if victim else 0.03)  # hunting: a short body is seen only if polled often
    else:
        say(f"timed out after {config.timeout_s:g} s")
    summary.completed = sum(1 for s in summary.statuses.values()
                            if s == ExecutionStatus.COMPLETED.value)


def _pick_victim(fleet: _Fleet, names: list[str], running: list[ExecutionNode],
                 say: _Printer, *, charge_only: bool, young_s: float | None) -> str | None:
    """The worker running a step (a card charge if `charge_only`; one that started under
    `young_s` ago unless it is None) right now."""
    now = utcnow()
    for node in running:
        if charge_only and node.metadata.get(Meta.TASK) != "example.charge_card":
            continue
        if young_s is not None and (now - node.created_at).total_seconds() > young_s:
            continue
        pid = int(str(node.metadata.get(Meta.OWNER, ":0")).rsplit(":", 1)[-1])
        for name in names:
            if pid in fleet.pool_pids(name) and node.seq >= 2:
                task = str(node.metadata.get(Meta.TASK)).removeprefix("example.")
                say(f"{say.name(node.execution_id)}: {task} is running on {name}")
                return name
    return None


def _note_node(node: ExecutionNode, seen: dict[str, tuple[str, int]], say: _Printer,
               kill_at: float | None, summary: DemoSummary) -> None:
    attempt = int(node.metadata.get(Meta.ATTEMPT, 1))
    key = (node.status.value, attempt)
    if seen.get(node.id) == key:
        return
    seen[node.id] = key
    task = str(node.metadata.get(Meta.TASK, "?")).removeprefix("example.")
    who = say.name(node.execution_id)
    recovered = node.metadata.get(Meta.RECOVERED_AT)
    extra = ""
    if recovered and kill_at is not None:
        # The next attempt carries recovered_at too: a CRASHED version that a live worker
        # replaced between two polls is still counted.
        delay = datetime.fromisoformat(str(recovered)).timestamp() - kill_at
        summary.resumed.setdefault(node.execution_id, round(delay, 2))
        extra = f" {delay:.1f} s after the kill"
    if node.status is Status.CRASHED and recovered:
        say(f"{who}: recovery found {task} orphaned and published it again{extra}")
    elif node.status is Status.RUNNING and attempt > 1:
        resumed = f" (recovery published it again{extra})" if recovered else ""
        say(f"{who}: {task} runs again (attempt {attempt}) on a live worker{resumed}")
    elif node.status is Status.SUCCESS and node.metadata.get(Meta.RECONCILED):
        say(f"{who}: {task} outcome was unknown; the provider confirmed the charge, so it "
            "was not charged again")
    elif node.status is Status.SUCCESS:
        say(f"{who}: {task} done")
    elif node.status in (Status.CRASHED, Status.IN_DOUBT, Status.FAILED):
        say(f"{who}: {task} {node.status.value}")


def _report(summary: DemoSummary, say: _Printer, out: TextIO, as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary.to_dict(), indent=2), file=out)
        return
    width = shutil.get_terminal_size((100, 20)).columns
    print("-" * min(width, 78), file=out)
    print(f"{'run':<8}{'status':<12}{'charges':<10}{'recovered after kill':<22}", file=out)
    for eid, status in summary.statuses.items():
        resumed = summary.resumed.get(eid)
        print(f"{say.name(eid):<8}{status:<12}{summary.charges.get(eid, 0):<10}"
              f"{'-' if resumed is None else f'{resumed:.1f} s':<22}", file=out)
    print("-" * min(width, 78), file=out)
    print(f"completed {summary.completed}/{summary.total}; each card charged exactly once: "
          f"{'yes' if summary.charged_once else 'NO'}; killed {summary.killed_worker or '-'}; "
          f"{summary.elapsed_s:.1f} s", file=out)
