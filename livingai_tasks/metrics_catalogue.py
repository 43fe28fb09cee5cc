"""Every series the package emits, listed once with its HELP text (`CATALOGUE`).

The engine's, the Celery signal handlers', recovery's, the durable waits' and the metrics
module's own. `declare_catalogue()` describes them all on a Metrics and zeroes every
counter, so that rate() and alerts see a series before its first event; a CheckpointEngine
does it on the Metrics it records into. tests/test_metrics.py checks that every series the
package records is here and every series here is recorded somewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

from .metrics import MAX_SERIES, PREFIX, Metrics

__all__ = ["Series", "CATALOGUE", "COUNTERS", "declare_catalogue"]


@dataclass(frozen=True)
class Series:
    """One series the package emits: its name in as_dict(), its kind and its HELP text."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    help: str

    @property
    def prometheus_name(self) -> str:
        """The name Prometheus sees (a histogram's samples add _bucket, _sum, _count)."""
        if self.kind == "counter":
            return f"{PREFIX}{self.name}_total"
        if self.kind == "histogram" and self.name.endswith("_ms"):
            return f"{PREFIX}{self.name[: -len('_ms')]}_seconds"
        return PREFIX + self.name


CATALOGUE: tuple[Series, ...] = (
    # The checkpoint engine (livingai_tasks.engine).
    Series("checkpoint_saves", "counter", "save() calls accepted (validated), and first "
           "records written by append_if_new()."),
    Series("checkpoint_execution_writes", "counter",
           "update_execution() and put_execution() calls accepted."),
    Series("checkpoint_budget_overruns", "counter", "Callers released before their write was "
           "durable (after durable_wait_ms, or at the budget); the write stays queued."),
    Series("checkpoint_not_durable", "counter", "durable=True calls that raised NotDurableError."),
    Series("checkpoint_dropped", "counter", "Writes lost: the write-behind queue was full "
           "under queue_full=drop (or the spill's disk refused one), the store kept refusing "
           "one, a spilled one was unreadable, or close() gave up on it under drop."),
    Series("checkpoint_spilled", "counter", "Writes put in the spill file on local disk "
           "because the memory queue was full (queue_max), or at close() with the store down."),
    Series("checkpoint_spill_drained", "counter", "Spilled writes read back into the memory "
           "queue to be written (a write read back again after a restart counts again)."),
    Series("checkpoint_spill_claimed", "counter", "Spilled writes found in the spill files of "
           "a process that is gone, claimed by this one to be written."),
    Series("checkpoint_writer_restarts", "counter", "Writer or encoder threads started again "
           "after they died (the cause is in the error log); nothing queued is lost."),
    Series("checkpoint_fenced_out", "counter", "Writes the store refused because their "
           "execution was taken over under a newer fence (a paused or stale worker's)."),
    Series("checkpoint_rejected", "counter", "Writes set aside: the store refused their content."),
    Series("checkpoint_sanitised", "counter", "Refused writes sent again with free text escaped."),
    Series("checkpoint_store_errors", "counter", "Failed store calls made by the writer thread."),
    Series("checkpoint_retries", "counter", "Store calls retried after a failure."),
    Series("checkpoint_batches", "counter", "Batches written, one store call each."),
    Series("checkpoint_batches_with_entry", "counter", "Of those, batches a step's entry "
           "carried in its own store call (a held outcome: stores with WritesBeforeEntry)."),
    Series("checkpoint_ops_written", "counter", "Writes that became durable."),
    Series("checkpoint_found_after_error", "counter", "Appends that raised yet had landed (the "
           "reply was lost), found by reading back, so not written twice."),
    Series("checkpoint_hot_hits", "counter", "Reads answered by the hot cache or the queue."),
    Series("checkpoint_cold_reads", "counter", "Reads that went to the store."),
    Series("checkpoint_cache_evictions", "counter",
           "Hot-cache entries evicted (by entries, bytes or TTL)."),
    Series("checkpoint_caller_encodes", "counter", "Saves that compressed their own state "
           "because unencoded_max_bytes of states waited for the writer (it is behind: raise "
           "the setting, or run fewer agents per process)."),
    Series("checkpoint_queue_depth", "gauge", "Writes queued in this process, not yet durable."),
    Series("checkpoint_cache_entries", "gauge", "Nodes in the hot cache."),
    Series("checkpoint_spill_bytes", "gauge", "Bytes of writes waiting in this process's spill "
           "files (its own and those it claimed)."),
    Series("checkpoint_cache_bytes", "gauge", "Bytes held by the hot cache (blobs, JSON and a "
           "fixed overhead per version)."),
    Series("checkpoint_held_ms", "histogram",
           "How long a write call held its caller, from call to return."),
    Series("checkpoint_encode_ms", "histogram", "Time to compress one state."),
    Series("checkpoint_durable_ms", "histogram", "From queued to the store having it."),
    Series("checkpoint_batch_ops", "histogram", "Writes per batch (one store call)."),
    # The Celery signal handlers (steps entering and finishing).
    Series("signal_errors", "counter", "Signal handlers of ours that raised: the step went on "
           "unrecorded (see the error log)."),
    Series("steps_requeued_store_down", "counter", "Steps sent back to the broker because "
           "their store stayed unreachable for store_wait_s: none ran unrecorded."),
    Series("steps_replayed", "counter", "Redelivered or resumed steps that had already "
           "succeeded: nothing ran again."),
    Series("steps_refused", "counter", "Step messages refused because they do not match the "
           "record of their task id (a reused id, a forged or stale header): nothing ran."),
    # Recovery (the beat-scheduled tick).
    Series("recovery_ticks", "counter", "Recovery ticks run."),
    Series("recovery_resumed", "counter", "Executions claimed by recovery ticks, sent on again."),
    Series("recovery_unreadable", "counter", "Orphaned executions a recovery tick skipped "
           "because their record could not be read (corrupt; logged once per process)."),
    Series("executions_in_doubt", "counter", "Executions held IN_DOUBT (a tool's side effect "
           "may have happened): waiting for a reconcile or `livingai-tasks resolve`."),
    # Durable waits (celery_wing/waits.py and wake.py).
    Series("waits_started", "counter", "Steps recorded WAITING (approval, event, sleep)."),
    Series("waits_woken", "counter", "WAITING steps claimed and published again."),
    Series("waits_timed_out", "counter", "Waits that reached their deadline first."),
    Series("events_sent", "counter", "Events and approval decisions stored."),
    # Journaled calls inside steps (celery_wing/journal.py).
    Series("calls_live", "counter", "Journaled calls made live (lai.call inside a step)."),
    Series("calls_replayed", "counter", "Journaled calls a re-run answered from their record "
           "instead of making them again."),
    # This module.
    Series("metrics_series_dropped", "counter", f"New series ignored because one kind already "
           f"had {MAX_SERIES} (are names built from data?)."),
)

COUNTERS: tuple[str, ...] = tuple(s.name for s in CATALOGUE if s.kind == "counter")


def declare_catalogue(metrics: Metrics) -> None:
    """Describe every catalogued series on `metrics` and zero its counters (idempotent: a
    counter that already counts keeps its value)."""
    for series in CATALOGUE:
        metrics.describe(series.name, series.help)
        if series.kind == "counter":
            metrics.incr(series.name, 0)
