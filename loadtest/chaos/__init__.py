"""Workload "chaos": real workers SIGKILLed at random (workload.py), read back from the
record (record.py); runs on the Celery fleet's app and processes (loadtest/fleet/).

    python -m loadtest.chaos --help
"""

from __future__ import annotations

from .workload import DESCRIPTION, NAME, run

__all__ = ["NAME", "DESCRIPTION", "run"]
