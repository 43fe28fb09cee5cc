"""The pool profile's arithmetic (`python -m loadtest.fleet.pool_profile`): which part a
py-spy stack counts for. Pure logic; the profile itself needs py-spy and a fleet run."""

from __future__ import annotations

from loadtest.fleet.pool_profile import OTHER, count_parts, part_of

_TRACE = "fast_trace_task (celery/app/trace.py:798);build_tracer.<locals>.trace_task (x:599)"


def test_a_stack_counts_for_its_most_specific_part() -> None:
    assert part_of(f"{_TRACE};_on_prerun (livingai_tasks/celery_wing/signals.py:66)") == \
        "entry (task_prerun)"
    assert part_of(f"{_TRACE};_plan (loadtest/fleet/app.py:170)") == "body"
    assert part_of(_TRACE) == "rest of Celery's trace"
    writer = "Thread._bootstrap_inner (threading.py:1045);Writer._supervised_loop (w.py:132)"
    assert part_of(writer) == "writer thread"
    assert part_of("select (selectors.py:1)") == OTHER


def test_raw_lines_are_summed_per_part_and_malformed_ones_skipped() -> None:
    lines = [f"{_TRACE};StepTask._recorded (steps.py:120) 3",
             f"{_TRACE};StepTask._recorded (steps.py:121) 2",
             f"{_TRACE} 4", "", "no count here"]
    assert count_parts(lines) == {"outcome": 5, "rest of Celery's trace": 4}


def test_thread_shares_scale_to_each_variant_s_pool_cpu_per_step() -> None:
    from collections import Counter

    from loadtest.fleet.pool_profile import threads_table

    spent = {"plain-tuned": Counter({"main user": 3.0, "main sys": 1.0}),
             "lai": Counter({"main user": 6.0, "main sys": 1.0, "threads user": 1.0})}
    rows = {line[:28].strip(): line[28:].split()
            for line in threads_table(spent, {"plain-tuned": 2.0, "lai": 4.0}).splitlines()[1:]}
    assert rows["main user"] == ["1.500", "3.000", "+1.500"]
    assert rows["main sys"] == ["0.500", "0.500", "+0.000"]
    assert rows["threads user"] == ["0.000", "0.500", "+0.500"]


def test_thread_seconds_reads_this_process_s_threads() -> None:
    import os
    import threading
    import time

    from loadtest.core.process_cpu import thread_seconds

    stop = threading.Event()
    spinner = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)])
    before = thread_seconds(os.getpid())
    spinner.start()
    try:
        deadline = time.monotonic() + 5
        while thread_seconds(os.getpid()).get("threads user", 0.0) < 0.05 and \
                time.monotonic() < deadline:
            time.sleep(0.01)
        spent = thread_seconds(os.getpid())
    finally:
        stop.set()
        spinner.join()
    # the spinner's CPU shows on a thread of its own; the sleeping main thread spent little
    assert spent["threads user"] - before.get("threads user", 0.0) >= 0.05
    assert spent["main user"] - before["main user"] < spent["threads user"]
