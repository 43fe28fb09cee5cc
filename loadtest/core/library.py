"""Every livingai_tasks internal the load tests use, in one place.

The workloads use the public API (`import livingai_tasks as lai`, the names in
`livingai_tasks.__all__`); what they need beyond it is imported here and nowhere else, so
that when the library moves a module this is the one file to change. Written against the
module paths of commit a0ef099 (`livingai_tasks.runtime`, `livingai_tasks.recovery_task`,
`livingai_tasks.install`).
"""

from __future__ import annotations

import hashlib
from typing import Any

from livingai_tasks import runtime as _runtime
from livingai_tasks.install import _CELERY_DEFAULTS
from livingai_tasks.recovery_task import RECOVER_TASK

__all__ = ["RECOVER_TASK", "INSTALL_CELERY_SETTINGS", "close_runtime", "idempotency_key_of"]

# The worker settings install() applies to an app: the "plain-tuned" fleet variant applies
# the same ones without our recording, so the comparison splits settings from recording.
INSTALL_CELERY_SETTINGS: dict[str, Any] = dict(_CELERY_DEFAULTS)


def close_runtime(timeout_s: float) -> None:
    """Drain and close the runtime install() configured in this process, if any (its
    writer thread holds the store the run is about to delete)."""
    if _runtime.is_configured():
        _runtime.get().close(timeout_s=timeout_s)


def idempotency_key_of(execution_id: str, node_id: str) -> str:
    """lai.idempotency_key() of a node, recomputed outside the step (the public function
    reads the running step's context). Mirrors livingai_tasks/context.py."""
    return "lai-" + hashlib.sha256(f"{execution_id}:{node_id}".encode()).hexdigest()[:40]
