"""The Celery fleet: workload "fleet" (throughput.py: steps/s of plain Celery against
livingai_tasks), and what the chaos run shares with it: the agent app the workers load
(app.py) and the worker processes with one run's names (processes.py).

    python -m loadtest.fleet --help
"""

from __future__ import annotations

from .throughput import DESCRIPTION, NAME, run

__all__ = ["NAME", "DESCRIPTION", "run"]
