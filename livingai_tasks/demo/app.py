"""`celery -A livingai_tasks.demo.app worker|beat`: the example agent's app, from the env."""

from __future__ import annotations

from .agent import make_app

app = make_app()
