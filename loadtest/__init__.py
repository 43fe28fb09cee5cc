"""Benchmarks of livingai_tasks' CheckpointEngine on real stores, against livingai 0.4.1.

    python -m loadtest all [--quick] [--stores sqlite,redis,postgres,tiered] [--only NAME,...]
                           [--baseline | --no-baseline] [--out DIR]
    python -m loadtest list
    python -m loadtest codecs

Workloads are modules of this package, run in the order of WORKLOADS; each has NAME,
DESCRIPTION and run(ctx) -> dict (see context.py). A name listed here whose module does not
exist yet is skipped with a message, so workloads can land one by one.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["WORKLOADS", "load_workload"]

WORKLOADS = ("single", "production", "hyperscale", "fleet", "chaos")


def load_workload(name: str) -> ModuleType | None:
    """The workload module `name`, or None if it does not exist (yet). An import error
    inside an existing module is not swallowed: that is a bug to see, not a skip."""
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{name}":
            return None
        raise
    for attr in ("NAME", "DESCRIPTION", "run"):
        if not hasattr(module, attr):
            raise AttributeError(f"Workload module loadtest.{name} has no {attr}: a workload "
                                 "needs NAME, DESCRIPTION and run(ctx) -> dict.")
    return module
