"""Durable waits at scale: `python -m loadtest.waits` (workload.py): thousands of executions
waiting at once on a real fleet, what they hold (worker slots, store bytes), what they cost
the recovery tick, and how fast an event resumes one.
"""

from __future__ import annotations

from .workload import DESCRIPTION, NAME, run

__all__ = ["NAME", "DESCRIPTION", "run"]
