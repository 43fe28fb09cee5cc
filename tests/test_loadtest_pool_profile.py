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
