"""Journaled calls on a real fleet: `python -m loadtest.journal` (workload.py): what
journaling adds to each model call of an agent (the raw `lai.call` core and the Pydantic AI
adapter) against the same agent plain, and how an agent killed after its 10th model call
resumes.
"""

from __future__ import annotations

from .workload import DESCRIPTION, NAME, run

__all__ = ["NAME", "DESCRIPTION", "run"]
