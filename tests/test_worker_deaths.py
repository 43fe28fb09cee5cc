"""A whole worker SIGKILLed at the library's DEFAULT settings, on Redis and on RabbitMQ
brokers, with steps running, reserved behind them and queued: every execution completes and
each side effect happens once. Without worker liveness the reserved ones would wait for the
stuck-step timer (60 s), on Redis for the visibility timeout (an hour)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import chain

import livingai_tasks as lai
from livingai_tasks import ExecutionStatus, Settings
from livingai_tasks.celery_wing import runtime as lai_runtime

from .conftest import REDIS_URL, need_rabbitmq
from .fleet import BROKER_DB, Fleet, children_of, execution_status, make_fleet, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

DEFAULTS = Settings()


@pytest.fixture(params=["redis", "rabbitmq"])
def default_fleet(request: pytest.FixtureRequest, tmp_path: Path,
                  redis_prefix: str) -> Iterator[Fleet]:
    broker = BROKER_DB if request.param == "redis" else need_rabbitmq()
    fleet = make_fleet(tmp_path, f"{REDIS_URL}?prefix={redis_prefix}", broker=broker,
                       lease_s=DEFAULTS.lease_s, recovery_interval_s=DEFAULTS.recovery_interval_s,
                       stuck_after_s=DEFAULTS.stuck_after_s, max_attempts=DEFAULTS.max_attempts)
    yield fleet
    fleet.close()
    lai_runtime.get().close()


def test_a_whole_worker_killed_holding_running_and_reserved_steps(default_fleet: Fleet) -> None:
    from tests.agent_app import charge_reconciled, plan, search, summarize

    fleet = default_fleet
    fleet.pause("search")
    # A worker that prefetches (a user's choice install() keeps): it holds messages it has
    # not started, which die with it.
    w1 = fleet.worker("w1", concurrency=2, extra=("--prefetch-multiplier", "3"))
    runs = [lai.start(chain(plan.s(f"trip {i}"), search.s(), charge_reconciled.s(),
                            summarize.s())) for i in range(6)]
    wait_for(lambda: fleet.count("search") >= 2 and fleet.count("plan") == len(runs), 60,
             "two searches to run and the rest to wait behind them")
    time.sleep(1.0)
    killed_at = time.time()
    w1.kill()  # the main process: its pool children die with it (PDEATHSIG)
    assert children_of(w1.pid) == []
    fleet.unpause("search")
    fleet.worker("w2", concurrency=2)
    fleet.beat()
    # Well before the stuck-step timer (stuck_after_s, 60 s), which is all that would find
    # the messages the dead worker had taken but not started.
    bound = DEFAULTS.stuck_after_s * 0.75
    resumed = {}
    for run in runs:
        wait_for(lambda r=run: execution_status(r.execution_id) is ExecutionStatus.COMPLETED,
                 max(bound - (time.time() - killed_at), 1.0),
                 f"execution {run.execution_id} to complete")
        resumed[run.execution_id] = time.time() - killed_at
    print(f"completed after the kill: {sorted(round(s, 1) for s in resumed.values())} s")
    assert fleet.count("charge_reconciled") == len(runs)  # each charge once
    assert fleet.count("summarize") == len(runs)
    assert all(run.get(timeout=30).startswith("done: trip") for run in runs)
