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
