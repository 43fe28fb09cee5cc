"""The recovery task, run by a worker on Celery beat's schedule (install() registers both).

Beat only sends the message; a worker runs the tick, which publishes steps again and never
runs one inline. Two beats, or a tick delivered twice, stay safe: each execution is claimed
with a compare-and-set before anything is published.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from . import runtime
from .resume import recover_once
from .settings import Settings

__all__ = ["register", "RECOVER_TASK", "BEAT_ENTRY"]

RECOVER_TASK = "livingai_tasks.recover"
BEAT_ENTRY = "livingai-tasks-recover"


def register(app: Celery, settings: Settings) -> None:
    """Register the recovery task on `app` and put it on the beat schedule (idempotent)."""
    if RECOVER_TASK not in app.tasks:

        # shared=False: a shared task would be added to every later Celery app as well, and
        # two apps that both install() would then clash on the name.
        @app.task(name=RECOVER_TASK, ignore_result=True, acks_late=False, shared=False)  # type: ignore[untyped-decorator]
        def recover(dry_run: bool = False) -> dict[str, Any]:
            rt = runtime.get()
            s = rt.settings
            report = recover_once(app, rt.engine.store, owner=f"recovery@{rt.owner}",
                                  lease_s=s.lease_s, max_attempts=s.max_attempts,
                                  max_recoveries=s.max_recoveries,
                                  stuck_after_s=s.stuck_after_s, page=s.recovery_page,
                                  dry_run=dry_run)
            rt.engine.metrics.incr("recovery_ticks")
            rt.engine.metrics.incr("recovery_resumed", len(report.claimed))
            return {"scanned": report.scanned, "claimed": report.claimed,
                    "published": report.published}

    schedule = dict(app.conf.beat_schedule or {})
    schedule[BEAT_ENTRY] = {
        "task": RECOVER_TASK,
        "schedule": settings.recovery_interval_s,
        # A tick that waited longer than one interval is superseded by the next one.
        "options": {"expires": settings.recovery_interval_s,
                    **({"queue": settings.recovery_queue} if settings.recovery_queue else {})},
    }
    app.conf.beat_schedule = schedule
