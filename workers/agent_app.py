"""The fleet's Celery app: `celery -A agent_app worker|beat|flower`, run from workers/.

A user's own app looks the same: configure Celery, call livingai_tasks.install(), import the
modules that define the steps.
"""

from __future__ import annotations

from celery import Celery

import livingai_tasks
import livingai_tasks.demo.agent  # noqa: F401 - its steps are shared tasks: this registers them

app = Celery("agent_app")
app.config_from_object("celeryconfig")
# The store comes from LIVINGAI_STORE; install() also puts the recovery task on beat's
# schedule. It must run in every process that defines the app: workers, beat and clients.
livingai_tasks.install(app)
