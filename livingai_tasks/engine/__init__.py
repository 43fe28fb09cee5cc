"""The checkpoint engine: a hot cache, a budgeted wait and a write-behind queue in front of a Store.

Its rooms, each in its own module:
  checkpoint_engine  CheckpointEngine, the facade callers use: validation in the caller's
                     thread, reads of this process's own newest versions before the store's;
                     SaveResult, WriteResult
  budget             Budget: how long a write holds its caller (`budget_ms`,
                     `durable_wait_ms`, durable=True and `sync_timeout_s`)
  results            SaveResult, WriteResult: what a write call tells its caller (`outcome`)
  write_behind       WriteBehind: one ordered queue per process (a data lane and a priority
                     lane), the only ways a write is ever lost (each counted in
                     `checkpoint_dropped`)
  writer             Writer: the supervised thread emptying it into the store, in batches,
                     retrying for ever on store outages, restarted if it dies
  ordering           PriorityOrder: what a priority write waits for (the writes it depends on)
  store_health       StoreHealth: failure streak, backoff, the last error, rate-limited logs
  spill              Spill: the disk tail of the data lane once `queue_max` writes wait in
                     memory (queue_full="spill"), and claiming a dead process's spill files
  compression        states compressed off the caller's thread, by the writer and, under a
                     backlog, by an encoder thread working ahead of it
  hot_cache          HotCache: this process's latest version of each node, bounded, expiring
  queued_write       QueuedWrite: one write, from submit() until durable
  (no_convoy_lock, in the core: NoConvoyLock, the lock of the queue, the cache and the metrics,
                     never handed to a thread that still waits for the GIL)

What the engine guarantees: a save holds its caller no longer than `budget_ms` (unless
durable=True); writes of one process land in the order they were made (a priority write
may pass data writes it does not depend on); a write that is not durable in time stays
queued, in memory or spilled to disk, and is retried until the store has it, so the only
losses are the drops listed in write_behind (queue full under queue_full="drop", a write
the store keeps refusing, close() under "drop"), each counted and logged, and the writes
in memory of a process that is killed (at most `queue_max`; its spill file survives).
save() says what became of each write (SaveResult.outcome). Its metrics, with their
Prometheus names, are listed in the catalogue of livingai_tasks.metrics (`CATALOGUE`);
every engine describes them all and zeroes every counter on the Metrics it records into.
"""

from __future__ import annotations

from .checkpoint_engine import CheckpointEngine, SaveResult, WriteResult
from .hot_cache import HotCache

__all__ = ["CheckpointEngine", "SaveResult", "WriteResult", "HotCache"]
