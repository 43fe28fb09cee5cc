"""What dead workers held, for one recovery tick (worker liveness: see liveness.py).

An execution a dead worker held is orphaned now, not when its lease runs out: its step's
lease, if the worker's child held it, will never be renewed, and a message the worker had
reserved but not started is not coming. Its record is forgotten once everything it held is
taken care of (claimed, finished, or taken over by a live worker).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..nodes import Execution
from ..stores import Store, TracksWorkers, WorkerRecord

__all__ = ["WorkerDeaths"]

log = logging.getLogger("livingai_tasks.recover")

# Lease owners that are recovery's (or an operator's) own claims, not a step's: a claim made
# for a message that a now-dead worker then took and never started.
_CLAIMS = ("recovery@", "cli@", "operator")


@dataclass
class WorkerDeaths:
    store: Store | None = None
    records: list[WorkerRecord] = field(default_factory=list)
    _holder: dict[str, WorkerRecord] = field(default_factory=dict)
    _unsettled: set[str] = field(default_factory=set)

    @classmethod
    def read(cls, store: Store, now: float, limit: int, *,
             after_outage: bool = False) -> WorkerDeaths:
        if not isinstance(store, TracksWorkers):
            return cls()
        try:
            records = store.dead_workers(now, limit=limit)
        except Exception:  # noqa: BLE001 - the leases still cover every execution
            log.exception("livingai_tasks: could not read the dead workers; leases alone "
                          "find their executions this tick")
            return cls()
        deaths = cls(store, records)
        for record in records:
            for execution_id in record.holding:
                deaths._holder.setdefault(execution_id, record)
        if records and after_outage:
            log.info("livingai_tasks: worker(s) %s have not beaten since the store was "
                     "unreachable; they have time to renew before what they hold is resumed",
                     ", ".join(r.worker for r in records))
        elif records:
            log.warning("livingai_tasks: worker(s) %s stopped beating; resuming what they held",
                        ", ".join(r.worker for r in records))
        return deaths

    def held(self) -> list[str]:
        return list(self._holder)

    def adopt(self, execution: Execution) -> bool:
        """Count `execution` as held by the dead worker whose process holds its lease, if
        one does (True)."""
        for record in self.records:
            if execution.lease_owner in record.owners:
                self._holder[execution.id] = record
                return True
        return False

    def holder_of(self, execution_id: str) -> WorkerRecord | None:
        return self._holder.get(execution_id)

    def claim_time(self, execution: Execution, now: float) -> float | None:
        """The `now` to claim `execution` with, or None if its lease is someone's alive.
        An expired lease is claimed as usual; a live one only if the dead worker's process,
        or recovery's claim it never started, holds it (then "now" is just past that lease,
        so a renewal by anyone else meanwhile still makes the claim fail)."""
        deadline = execution.lease_deadline
        if deadline is None or deadline < now:
            return now if deadline is not None else None
        holder = self.holder_of(execution.id)
        owner = execution.lease_owner or ""
        if holder is not None and (owner in holder.owners or owner.startswith(_CLAIMS)):
            return deadline + 1e-3
        return None  # someone alive holds it (the broker gave a live worker the message)

    def unsettled(self, execution_id: str) -> None:
        """Not taken care of this tick (it waits, or cannot be read): keep its holder."""
        self._unsettled.add(execution_id)

    def forget_settled(self) -> None:
        if not isinstance(self.store, TracksWorkers):
            return
        for record in self.records:
            if not self._unsettled.intersection(record.holding):
                try:
                    self.store.forget_worker(record.worker)
                except Exception:  # noqa: BLE001 - forgotten on a later tick
                    log.warning("livingai_tasks: could not forget dead worker %s",
                                record.worker)
