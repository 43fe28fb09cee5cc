"""Steps while the store is cut off (a real TCP cut in front of the real Redis store), on
real workers: nothing runs unrecorded, and nothing goes on from an effect the store does
not have."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from celery import chain

import livingai_tasks as lai
from livingai_tasks import ExecutionStatus
from livingai_tasks.celery_wing import runtime as lai_runtime

from .conftest import POSTGRES_URL, REDIS_URL, pg_url
from .fleet import Fleet, execution_status, make_fleet, wait_for
from .tcp_proxy import TcpProxy, proxy_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


@pytest.fixture
def cut_fleet(tmp_path: Path, redis_prefix: str) -> Iterator[tuple[Fleet, TcpProxy]]:
    """A fleet whose workers reach their store through a proxy the test can cut; the test
    process itself talks to the store directly."""
    from tests import agent_app

    proxy = proxy_for(REDIS_URL)
    direct = f"{REDIS_URL}?prefix={redis_prefix}"
    fleet = make_fleet(tmp_path, proxy.url(direct))
    lai.install(agent_app.app, store=direct, **fleet.settings)
    yield fleet, proxy
    proxy.restore()
    fleet.close()
    proxy.close()
    lai_runtime.get().close()


def test_a_tools_success_the_store_cannot_take_stops_the_chain(
        cut_fleet: tuple[Fleet, TcpProxy]) -> None:
    from tests.agent_app import charge_card, plan, search, summarize

    fleet, proxy = cut_fleet
    fleet.pause("charge_card")
    w1 = fleet.worker("w1")
    fleet.beat()
    run = lai.start(chain(plan.s("cut"), search.s(), charge_card.s(), summarize.s()))
    wait_for(lambda: fleet.count("charge_card") == 1, 30, "the charge to be made")
    proxy.cut()
    fleet.unpause("charge_card")
    # Its SUCCESS cannot be made durable (10 s): the chain must not go on without it.
    wait_for(lambda: "is not durable" in w1.text(), 40, "the tool's SUCCESS to time out")
    time.sleep(2)
    assert fleet.count("summarize") == 0
    proxy.restore()
    wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.COMPLETED, 90,
             "the chain to go on from the recorded SUCCESS once the store is back")
    assert fleet.count("charge_card") == 1 and fleet.count("summarize") == 1


def test_a_worker_takes_no_step_until_its_store_answers(
        cut_fleet: tuple[Fleet, TcpProxy]) -> None:
    from tests.agent_app import plan, summarize

    fleet, proxy = cut_fleet
    proxy.cut()
    w1 = fleet.worker("w1", wait=False)
    runs = [lai.start(chain(plan.s(f"later {i}"), summarize.s())) for i in range(3)]
    wait_for(lambda: "unreachable" in w1.text(), 30, "the worker to say its store is down")
    time.sleep(3)
    assert fleet.count("plan") == 0 and "ready." not in w1.text()  # the messages wait
    proxy.restore()
    for run in runs:
        wait_for(lambda r=run: execution_status(r.execution_id) is ExecutionStatus.COMPLETED,
                 60, "the execution to complete once the store answers")
    assert fleet.count("plan") == 3 and fleet.count("summarize") == 3


@pytest.fixture
def cut_pg_fleet(tmp_path: Path, pg_schema: str) -> Iterator[tuple[Fleet, TcpProxy]]:
    """The same on PostgreSQL, whose entry check (a read) and a tool's start record (a
    write) are two round trips: the store can go away between them."""
    from tests import agent_app

    proxy = proxy_for(POSTGRES_URL)
    direct = pg_url(pg_schema)
    fleet = make_fleet(tmp_path, proxy.url(direct))
    lai.install(agent_app.app, store=direct, **fleet.settings)
    lai_runtime.get().engine.store.migrate()
    yield fleet, proxy
    proxy.restore()
    fleet.close()
    proxy.close()
    lai_runtime.get().close()


def test_a_tool_whose_start_the_store_cannot_take_goes_back_to_the_broker(
        cut_pg_fleet: tuple[Fleet, TcpProxy]) -> None:
    from tests.agent_app import charge_card, plan, search, summarize

    fleet, proxy = cut_pg_fleet
    fleet.pause("after_entry_read:charge_card")
    w1 = fleet.worker("w1")
    fleet.beat()
    run = lai.start(chain(plan.s("late cut"), search.s(), charge_card.s(), summarize.s()))
    wait_for(lambda: fleet.count("search") == 1 and w1.text().count("] received") == 3, 30,
             "the tool's entry check (w1 holds it at the flag)")
    time.sleep(0.5)
    proxy.cut()  # between the entry check and the record of the tool's start
    fleet.unpause("after_entry_read:charge_card")
    wait_for(lambda: "its start could not be made durable" in w1.text(), 40,
             "the tool's start to time out")
    assert fleet.count("charge_card") == 0  # not run without its start on record
    proxy.restore()
    wait_for(lambda: execution_status(run.execution_id) is ExecutionStatus.COMPLETED, 120,
             "the tool to run once the store is back, and the chain to complete")
    assert run.get(timeout=30) == "done: late cut"
    assert fleet.count("charge_card") == 1 and fleet.count("summarize") == 1
    # w1 could not renew its liveness through the cut: a tick in its pool child right after
    # the store came back (its writes had failed) must not have taken it for dead.
    assert "stopped beating" not in w1.text()
