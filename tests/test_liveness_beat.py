"""The worker's liveness thread (celery_wing/liveness.py) as pure logic, on the memory store:
which messages make it beat early, and what an early beat sends. (Real workers dying with
their record are in test_worker_deaths.py.)"""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest
from celery.worker import state as worker_state

from livingai_tasks import Settings
from livingai_tasks.celery_wing.liveness import WorkerBeat
from livingai_tasks.celery_wing.messages import HEADER_EXECUTION
from livingai_tasks.stores.memory import MemoryStore


@pytest.fixture()
def held(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Celery's registry of the requests this worker holds, empty for the test."""
    requests: dict[str, Any] = {}
    monkeypatch.setattr(worker_state, "requests", requests)
    return requests


def _hold(requests: dict[str, Any], task_id: str, execution_id: str) -> None:
    requests[task_id] = SimpleNamespace(request_dict={HEADER_EXECUTION: execution_id})


def _record(store: MemoryStore) -> Any:
    [record] = store.workers()
    return record


def _wait_for(predicate: Any, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return False


def test_only_a_message_of_an_execution_the_record_does_not_list_beats_early(
        held: dict[str, Any]) -> None:
    store = MemoryStore()
    sums = []

    def counters() -> dict[str, float]:
        sums.append(1)
        return {"steps_started": float(len(sums))}

    # Timed beats a minute apart: within the test only pokes can make one.
    beat = WorkerBeat(Settings(worker_beat_s=60, worker_ttl_s=120), None, store,
                      counters=counters)
    _hold(held, "t1", "e1")
    assert beat.start()
    try:
        first = _record(store)
        assert first.holding == ("e1",) and first.counters == {"steps_started": 1.0}

        # The next step of e1 (a chain going on on this worker): the record lists e1 already.
        _hold(held, "t2", "e1")
        beat.poke("e1")
        time.sleep(0.5)
        assert _record(store) is first

        # A message of a new execution: beaten within the gathering pause, with the
        # counters the last beat summed (summing reads every process's snapshot).
        _hold(held, "t3", "e2")
        beat.poke("e2")
        assert _wait_for(lambda: _record(store).holding == ("e1", "e2"))
        assert _record(store).counters == {"steps_started": 1.0} and len(sums) == 1

        # A message whose execution is unknown (not a step) beats too.
        before = _record(store)
        beat.poke(None)
        assert _wait_for(lambda: _record(store) is not before)
    finally:
        beat.stop()
