"""A real worker's metrics: every pool child's counters at one /metrics endpoint of the
main process, a SIGKILLed child's counts kept, `livingai-tasks stats` summing the fleet
from the store, and a port in use refused at start."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import livingai_tasks as lai

from .fleet import ROOT, Fleet, children_of, make_fleet, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if not s.labels}


@pytest.fixture
def metered(tmp_path: Path, redis_prefix: str) -> Iterator[tuple[Fleet, int]]:
    from livingai_tasks.celery_wing import runtime

    from .conftest import REDIS_URL

    port = _free_port()
    fleet = make_fleet(tmp_path, f"{REDIS_URL}?prefix={redis_prefix}",
                       extra_env={"LIVINGAI_METRICS_PORT": str(port)})
    yield fleet, port
    fleet.close()
    runtime.get().close()


def _settled(port: int, name: str = "livingai_checkpoint_saves_total") -> float:
    """`name` once two scrapes 1.5 s apart agree: every process's last snapshot is in."""
    last = _scrape(port)[name]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        time.sleep(1.5)
        now = _scrape(port)[name]
        if now == last:
            return now
        last = now
    raise AssertionError(f"{name} did not settle: {last}")


def _run_steps(n: int, start: int = 0) -> None:
    from tests.agent_app import long_step

    runs = [lai.start(long_step.s(i)) for i in range(start, start + n)]
    for run in runs:
        run.get(timeout=60)


def _child_counts(main_pid: int) -> dict[int, float]:
    """checkpoint_saves of each process of the worker, from its snapshot files."""
    from livingai_tasks.metrics_fleet import worker_folder

    folder = worker_folder(f"{socket.gethostname()}:{main_pid}")
    counts: dict[int, float] = {}
    for path in folder.glob("*-*.json"):
        data = json.loads(path.read_text())
        counts[int(data["pid"])] = data["counters"].get("checkpoint_saves", 0)
    return counts


def test_one_endpoint_sums_every_pool_child_and_keeps_a_killed_ones_counts(
        metered: tuple[Fleet, int]) -> None:
    fleet, port = metered
    worker = fleet.worker("w1", concurrency=2)
    # Up, before any step: every catalogued counter is there at 0.
    before = _scrape(port)
    assert before["livingai_checkpoint_saves_total"] == 0
    assert before["livingai_checkpoint_rejected_total"] == 0

    _run_steps(8)
    # Each long_step checkpoints 5 times: 40 user checkpoints, spread over both children.
    wait_for(lambda: fleet.count("long_step_iter") == 40, 10, "every checkpoint")
    saves = _settled(port)
    scraped = _scrape(port)
    children = children_of(worker.pid)
    per_child = _child_counts(worker.pid)
    worked = [pid for pid in children if per_child.get(pid, 0) > 0]
    assert worked, per_child
    # The endpoint shows the sum of the processes, not any one of them.
    assert saves == sum(per_child.values()) and saves >= 40
    assert scraped["livingai_checkpoint_dropped_total"] == 0

    # SIGKILL a child that recorded work, at rest: Celery starts another in its place.
    victim = worked[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in children_of(worker.pid)
             and len(children_of(worker.pid)) == 2, 30, "Celery to replace the child")
    after = _scrape(port)
    assert after["livingai_checkpoint_saves_total"] == saves  # nothing lost
    assert after["livingai_checkpoint_held_seconds_count"] == \
        scraped["livingai_checkpoint_held_seconds_count"]

    # More work, on the new child too, adds to the dead one's counts: per step, as many
    # saves as before the kill (8 steps made `saves`).
    _run_steps(4, start=100)
    wait_for(lambda: fleet.count("long_step_iter") == 60, 10, "every checkpoint")
    assert _settled(port) == saves * 12 / 8


def test_stats_shows_the_fleets_counters_from_the_store(metered: tuple[Fleet, int]) -> None:
    fleet, port = metered
    fleet.worker("w1", concurrency=2)
    _run_steps(6)
    wait_for(lambda: fleet.count("long_step_iter") == 30, 10, "every checkpoint")

    def stats() -> dict[str, object]:
        out = subprocess.run(
            [sys.executable, "-m", "livingai_tasks.cli", "stats", "--json", "--store",
             fleet.env["LIVINGAI_STORE"]], cwd=ROOT, env=fleet.env, capture_output=True,
            text=True, timeout=60, check=True)
        return dict(json.loads(out.stdout)["fleet"])

    # The liveness beat (every 2 s) carries the worker's sum; it settles once both
    # children's last snapshots are in.
    def same() -> bool:
        counters = stats()["counters"]
        assert isinstance(counters, dict)
        return counters.get("checkpoint_saves") == \
            _scrape(port)["livingai_checkpoint_saves_total"]

    wait_for(same, 20, "stats to show what the endpoint shows")
    fleet_stats = stats()
    assert fleet_stats["live_workers"] == 1
    assert fleet_stats["counters"]["checkpoint_saves"] >= 30  # type: ignore[index]
    assert "checkpoint_dropped" not in fleet_stats["counters"]  # type: ignore[operator]
    text = subprocess.run(
        [sys.executable, "-m", "livingai_tasks.cli", "stats", "--store",
         fleet.env["LIVINGAI_STORE"]], cwd=ROOT, env=fleet.env, capture_output=True,
        text=True, timeout=60, check=True).stdout
    assert "fleet counters: summed over the liveness records of 1 live worker(s)" in text
    assert "checkpoint_saves" in text and "worker_ttl_s" in text


def test_a_port_in_use_stops_the_worker_with_a_clear_error(tmp_path: Path,
                                                           redis_prefix: str) -> None:
    from livingai_tasks.celery_wing import runtime

    from .conftest import REDIS_URL

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        fleet = make_fleet(tmp_path, f"{REDIS_URL}?prefix={redis_prefix}",
                           extra_env={"LIVINGAI_METRICS_PORT": str(port)})
        try:
            worker = fleet.worker("w1", wait=False)
            assert worker.popen.wait(60) != 0
            log = worker.text()
            assert f"metrics_port {port}: cannot listen on 127.0.0.1:{port}" in log
            assert "free TCP port 1..65535" in log and "ready." not in log
        finally:
            fleet.close()
            runtime.get().close()


def test_recovery_counts_reach_the_endpoint_of_the_worker_that_ran_the_tick(
        metered: tuple[Fleet, int]) -> None:
    """A whole worker SIGKILLed in a non-idempotent tool: the next worker (on the same
    port, which the dead one's processes no longer hold) runs the recovery tick that holds
    the execution IN_DOUBT, and its endpoint counts it."""
    from celery import chain

    from tests.agent_app import charge_card, plan, search, summarize

    from .fleet import execution_status

    fleet, port = metered
    fleet.pause("charge_card")
    w1 = fleet.worker("w1")
    run = lai.start(chain(plan.s("trip"), search.s(), charge_card.s(), summarize.s()))
    wait_for(lambda: fleet.count("charge_card") == 1, 30, "the charge to start")
    w1.kill()
    fleet.unpause("charge_card")
    fleet.worker("w2", concurrency=2)
    fleet.beat()
    wait_for(lambda: execution_status(run.execution_id) is lai.ExecutionStatus.IN_DOUBT, 30,
             "IN_DOUBT")
    wait_for(lambda: _scrape(port)["livingai_executions_in_doubt_total"] == 1, 10,
             "the in-doubt count")
    scraped = _scrape(port)
    assert scraped["livingai_recovery_ticks_total"] >= 1
    assert scraped["livingai_recovery_resumed_total"] >= 1  # the claim that held it
