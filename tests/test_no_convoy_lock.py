"""NoConvoyLock: the lock of the engine's queue, hot cache and metrics (pure logic, threads)."""

from __future__ import annotations

import threading
import time

from livingai_tasks.no_convoy_lock import NoConvoyLock


def test_it_excludes_other_threads() -> None:
    lock = NoConvoyLock()
    count = [0]

    def bump() -> None:
        for _ in range(200):
            with lock:
                seen = count[0]
                time.sleep(0)  # hand the GIL over inside the critical section
                count[0] = seen + 1

    threads = [threading.Thread(target=bump) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert count[0] == 8 * 200


def test_a_waiter_gets_the_lock_when_the_holder_lets_go() -> None:
    lock = NoConvoyLock()
    lock.acquire()
    got: list[float] = []

    def waiter() -> None:
        assert lock.acquire()
        got.append(time.monotonic())
        lock.release()

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.05)
    assert not got and lock.locked()
    released = time.monotonic()
    lock.release()
    thread.join(timeout=5)
    assert got and got[0] >= released
    assert not lock.locked()


def test_non_blocking_and_timed_acquire_give_up_on_a_held_lock() -> None:
    lock = NoConvoyLock()
    with lock:
        assert lock.acquire(blocking=False) is False
        start = time.monotonic()
        assert lock.acquire(timeout=0.05) is False
        assert time.monotonic() - start >= 0.05
    assert lock.acquire(timeout=0.05) is True
    lock.release()


def test_a_condition_on_it_waits_and_wakes() -> None:
    lock = NoConvoyLock()
    ready = lock.condition()
    items: list[int] = []

    def producer() -> None:
        time.sleep(0.02)
        with ready:
            items.append(1)
            ready.notify()

    thread = threading.Thread(target=producer)
    thread.start()
    with ready:
        assert ready.wait_for(lambda: items, timeout=5)
    thread.join()
    with ready:
        assert ready.wait(0.01) is False  # times out with nobody to notify it
    assert not lock.locked()
