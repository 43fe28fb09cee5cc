"""NoConvoyLock: the lock of the engine's queue, hot cache and metrics (pure logic, threads)."""

from __future__ import annotations

import threading
import time

import pytest

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


def test_many_threads_through_conditions_lose_no_wake_up() -> None:
    """Producers and consumers on two Conditions of one lock, as the engine's queue has: if a
    release ever left a waiter asleep with the lock free, this would hang, not finish."""
    lock = NoConvoyLock()
    not_empty, not_full = lock.condition(), lock.condition()
    items: list[int] = []
    taken: list[int] = []
    producers, consumers, per_producer, capacity = 8, 4, 300, 5

    def produce(base: int) -> None:
        for i in range(per_producer):
            with not_full:
                while len(items) >= capacity:
                    not_full.wait()
                items.append(base + i)
                not_empty.notify()

    def consume() -> None:
        while True:
            with not_empty:
                while not items:
                    not_empty.wait()
                item = items.pop(0)
                not_full.notify()
            if item < 0:
                return
            taken.append(item)

    threads = [threading.Thread(target=produce, args=(p * per_producer,))
               for p in range(producers)]
    threads += [threading.Thread(target=consume) for _ in range(consumers)]
    for t in threads:
        t.start()
    for t in threads[:producers]:
        t.join(timeout=30)
    for _ in range(consumers):
        with not_full:
            while len(items) >= capacity:
                not_full.wait()
            items.append(-1)
            not_empty.notify()
    for t in threads[producers:]:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a thread never woke up"
    assert sorted(taken) == list(range(producers * per_producer))


def test_deferred_work_runs_at_once_on_a_free_lock() -> None:
    lock = NoConvoyLock()
    ran: list[bool] = []
    lock.defer(lambda: ran.append(lock.locked()))
    assert ran == [True]  # under the lock
    assert not lock.locked()


def test_work_deferred_on_a_held_lock_runs_in_the_holder_before_it_lets_go() -> None:
    lock = NoConvoyLock()
    ran: list[tuple[str, bool]] = []
    lock.acquire()
    deferrer = threading.Thread(
        target=lambda: lock.defer(lambda: ran.append((threading.current_thread().name,
                                                      lock.locked()))),
        name="deferrer")
    started = time.monotonic()
    deferrer.start()
    deferrer.join(5)
    assert not deferrer.is_alive() and time.monotonic() - started < 1  # it did not wait
    assert ran == []  # not yet: the lock is held
    lock.release()
    assert ran == [(threading.current_thread().name, True)]  # the holder ran it, locked
    assert not lock.locked()


def test_deferred_work_comes_before_the_next_critical_section_in_order() -> None:
    lock = NoConvoyLock()
    log: list[int] = []
    lock.acquire()
    for i in range(3):
        t = threading.Thread(target=lock.defer, args=(lambda i=i: log.append(i),))
        t.start()
        t.join()
    lock.release()
    with lock:
        log.append(99)
    assert log == [0, 1, 2, 99]


def test_a_failing_piece_of_deferred_work_is_logged_and_the_rest_runs(
        caplog: pytest.LogCaptureFixture) -> None:
    lock = NoConvoyLock()
    ran: list[str] = []
    lock.acquire()
    lock._deferred.append(lambda: 1 / 0)  # as a thread that found the lock held would
    lock._deferred.append(lambda: ran.append("after"))
    lock.release()
    assert ran == ["after"] and "deferred to a lock holder failed" in caplog.text
    assert not lock.locked()


def test_no_deferred_work_is_lost_or_run_twice_under_contention() -> None:
    """Threads defer while others hold the lock and sleep inside it, and while holders
    wait on a Condition (which lets the lock go and takes it back): every piece runs."""
    lock = NoConvoyLock()
    cond = lock.condition()
    ran: list[int] = []
    stop = threading.Event()

    def holder() -> None:
        while not stop.is_set():
            with lock:
                time.sleep(0)
                cond.wait(0.0005)

    def deferrer(base: int) -> None:
        for i in range(400):
            lock.defer(lambda n=base + i: ran.append(n))
            if i % 50 == 0:
                time.sleep(0.001)

    holders = [threading.Thread(target=holder) for _ in range(3)]
    deferrers = [threading.Thread(target=deferrer, args=(k * 1000,)) for k in range(6)]
    for t in holders + deferrers:
        t.start()
    for t in deferrers:
        t.join()
    stop.set()
    for t in holders:
        t.join()
    with lock:  # anything still deferred runs now, before this section
        done = sorted(ran)
    assert done == sorted(k * 1000 + i for k in range(6) for i in range(400))
