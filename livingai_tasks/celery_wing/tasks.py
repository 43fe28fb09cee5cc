"""The library's own Celery tasks: the recovery tick (on beat's schedule; it also wakes due
durable waits, wake.py) and the stand-in
step MOCK_TOOLS replay puts where a tool was. install() registers both on the app.

Beat only sends the tick's message; a worker runs the tick, which publishes steps again
and never runs one inline. Two beats, or a tick delivered twice, stay safe: each execution
is claimed with a compare-and-set before anything is published.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from ..engine.store_health import last_failure
from ..nodes import NodeType
from ..settings import Settings
from . import runtime
from .recover import recover_once
from .steps import agent_step
from .wake import wake_due

__all__ = ["register", "RECOVER_TASK", "BEAT_ENTRY", "RECORDED_TASK"]

RECOVER_TASK = "livingai_tasks.recover"
BEAT_ENTRY = "livingai-tasks-recover"
RECORDED_TASK = "livingai_tasks.recorded_output"


def register(app: Celery, settings: Settings) -> None:
    """Register the library's tasks on `app` and put the tick on beat's schedule
    (idempotent). Workers must know both, so install() runs this everywhere."""
    _register_recovery(app, settings)
    _register_recorded_output(app)


def _register_recovery(app: Celery, settings: Settings) -> None:
    if RECOVER_TASK not in app.tasks:

        # shared=False: a shared task would be added to every later Celery app as well, and
        # two apps that both install() would then clash on the name.
        @app.task(name=RECOVER_TASK, ignore_result=True, acks_late=False, shared=False)  # type: ignore[untyped-decorator]
        def recover(dry_run: bool = False) -> dict[str, Any]:
            rt = runtime.get()
            report = recover_once(app, rt.engine.store, rt.settings,
                                  owner=f"recovery@{rt.owner}", dry_run=dry_run,
                                  store_failed_at=last_failure())
            rt.engine.metrics.incr("recovery_ticks")
            rt.engine.metrics.incr("recovery_resumed", len(report.claimed))
            rt.engine.metrics.incr("recovery_unreadable", len(report.unreadable))
            rt.engine.metrics.incr("executions_in_doubt", len(report.in_doubt))
            # Due waits (sleeps, timeouts, events whose wake was lost) ride the same tick:
            # nothing for them sits in the broker, so no broker restart can lose or repeat one.
            woken = wake_due(app, rt.engine.store, rt.settings, by=f"recovery@{rt.owner}") \
                if not dry_run else None
            return {"scanned": report.scanned, "claimed": report.claimed,
                    "published": report.published,
                    "woken": woken.woken + woken.timed_out if woken else []}

    schedule = dict(app.conf.beat_schedule or {})
    schedule[BEAT_ENTRY] = {
        "task": RECOVER_TASK,
        "schedule": settings.recovery_interval_s,
        # A tick that waited longer than one interval is superseded by the next one.
        "options": {"expires": settings.recovery_interval_s,
                    **({"queue": settings.recovery_queue} if settings.recovery_queue else {})},
    }
    app.conf.beat_schedule = schedule


def _register_recorded_output(app: Celery) -> None:
    """The stand-in MOCK_TOOLS puts where a tool was: returns what the tool returned."""
    if RECORDED_TASK not in app.tasks:

        @agent_step(app, name=RECORDED_TASK, type=NodeType.TOOL, shared=False)
        def recorded_output(*args: Any, output: Any = None, **_: Any) -> Any:
            return output
