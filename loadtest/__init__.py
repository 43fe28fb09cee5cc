"""Benchmarks of livingai_tasks on real stores and real Celery workers.

    python -m loadtest all [--quick] [--stores ...] [--only NAME,...] [--baseline | --no-baseline]
                           [--out DIR] [--unencoded-max-mib N]
    python -m loadtest list | codecs | markdown RESULTS_JSON
    python -m loadtest.fleet ...      python -m loadtest.chaos ...

core/ is what every workload shares; tiers/ the checkpoint tiers against livingai 0.4.1;
fleet/ the Celery fleet's throughput, and the app and processes chaos/ runs on too.
WORKLOADS names each workload's module, in the order `all` runs them; a module has NAME,
DESCRIPTION and run(ctx) -> dict (core/context.py). A listed module that does not exist
yet is skipped with a message, so workloads can land one by one.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["WORKLOADS", "load_workload"]

WORKLOADS = {"single": "loadtest.tiers.single", "production": "loadtest.tiers.production",
             "hyperscale": "loadtest.tiers.hyperscale", "fleet": "loadtest.fleet",
             "chaos": "loadtest.chaos"}


def load_workload(name: str) -> ModuleType | None:
    """The workload module `name`, or None if it does not exist (yet). An import error
    inside an existing module is not swallowed: that is a bug to see, not a skip."""
    path = WORKLOADS[name]
    try:
        module = importlib.import_module(path)
    except ModuleNotFoundError as exc:
        if exc.name == path:
            return None
        raise
    for attr in ("NAME", "DESCRIPTION", "run"):
        if not hasattr(module, attr):
            raise AttributeError(f"Workload module {path} has no {attr}: a workload "
                                 "needs NAME, DESCRIPTION and run(ctx) -> dict.")
    return module
