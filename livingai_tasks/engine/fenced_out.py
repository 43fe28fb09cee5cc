"""What this process wrote that the store refused for its fence: the steps it lost.

A store refuses a record made under a fence older than its execution's (recovery or an
operator took the execution over: this worker was paused, or slow, past its lease). Nothing
can make such a write land, so the writer takes it off the queue as done, marked; this
remembers which nodes were lost, so the step's outcome does not advance the chain from
here, and says so once per execution.
"""

from __future__ import annotations

import logging

from ..metrics import Metrics
from ..stores.base import Fenced, fence_of
from .queued_write import QueuedWrite

__all__ = ["FencedOut"]

log = logging.getLogger("livingai_tasks.engine")


class FencedOut:
    def __init__(self, store_url: str, metrics: Metrics) -> None:
        self.store_url = store_url
        self.metrics = metrics
        self.nodes: dict[str, int] = {}  # node id -> the fence its refused version carried
        self._logged: set[str] = set()

    def note(self, batch: list[QueuedWrite], fenced: Fenced) -> None:
        """Mark the writes of `batch` the store refused (`fenced`)."""
        refused = [op for op in batch
                   if (op.node is not None and op.node.id in fenced.nodes)
                   or (op.kind == "update" and op.execution_id in fenced.executions)]
        for op in refused:
            op.fenced = True
            if op.node is not None:
                self.nodes[op.node.id] = fence_of(op.node)
        self.metrics.incr("checkpoint_fenced_out", len(refused))
        for execution_id in sorted({op.execution_id for op in refused} - self._logged):
            self._logged.add(execution_id)
            log.warning("Store %s refused writes of execution %s made under an older fence: "
                        "it was taken over (recovery or an operator); this process stops "
                        "recording for it", self.store_url, execution_id)
