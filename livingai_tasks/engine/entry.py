"""A step's entry in one store call, carrying what this process's writer gathered before it.

The entry (store.append_if_new: the entry check and the step's RUNNING record with its
lease) is synchronous: the step may not start before the store answers. On a store that can
put a write batch in front of it in the same call (WritesBeforeEntry, Redis), the writer
holds an idempotent step's outcome for a while (writer.OUTCOME_HOLD_S) instead of sending it
alone, and the next step this process starts takes it along: one round trip a step where
there were two. The batch goes first and a failing batch stops the call before the entry,
so the entry never lands ahead of the writes queued before it.
"""

from __future__ import annotations

from typing import Any, cast

from ..errors import FencedOutError
from ..nodes import ExecutionNode
from ..stores.base import AppendsIfNew, WritesBeforeEntry
from .write_behind import WriteBehind
from .writer import batch_writes

__all__ = ["enter"]


def enter(store: AppendsIfNew, wb: WriteBehind | None, node: ExecutionNode,
          changes: dict[str, Any]) -> ExecutionNode | None:
    """store.append_if_new(node, changes), with the writer's next batch in front of it when
    `wb` (this process's queue, if it has one) holds outcomes for its store and lends it
    (Writer.borrow). The batch is given back written, or failed: the writer then sends it
    again, read back first."""
    batch = wb.writer.borrow() if wb is not None and wb.writer.holds_outcomes else None
    if wb is None or batch is None:
        return store.append_if_new(node, changes)
    nodes, updates = batch_writes(batch)
    try:
        fenced, existing = cast(WritesBeforeEntry, store).write_then_append_if_new(
            nodes, updates, node, changes)
    except FencedOutError as exc:
        written = getattr(exc, "written", None)  # None: the batch did not land
        wb.writer.give_back(batch, failed=written is None, fenced=written)
        raise
    except BaseException:
        wb.writer.give_back(batch, failed=True)
        raise
    wb.writer.give_back(batch, fenced=fenced)
    return existing
