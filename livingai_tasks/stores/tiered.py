"""tiered+redis:// — Redis as a hot cache over PostgreSQL, the tier of record.

    tiered+redis://host:6379/0?prefix=lai&durable=<URL-encoded postgresql url>
    tiered+rediss://...                                  Redis over TLS

A write is done once PostgreSQL has it; Redis is written after, and a Redis failure only
costs speed (a warning once per outage, a counter): reads fall back to PostgreSQL.

Redis serves what it can answer exactly: the latest version of a node and the latest
checkpoint, the reads a running step makes. Whole lists (nodes(), node_versions()) come from
PostgreSQL, because after Redis lost its data it may hold only the versions written since,
and nothing in Redis could tell a partial list from a complete one. Executions live in
PostgreSQL only: they are what recovery decides on (claims, fences, leases), they change
field by field, and a copy that missed one change would tell a reader the wrong status.

A process can die between its PostgreSQL write and its Redis write (a worker SIGKILLed), and
nobody is left to fix Redis. So the keys a write is about to change are deleted from Redis
before PostgreSQL is written: whatever happens next, Redis holds the new version or nothing.

When that delete fails (Redis unreachable from this process, perhaps from it alone), Redis
may go on serving the old version to other processes. So the keys are first recorded in
PostgreSQL (lai_tier_missed), then the version is written, and the record outlives the
process. Whoever reaches Redis next deletes the keys, then the record (`sweep_hot_tier()`):
this process when Redis answers it again or when it closes the store, and the recovery tick,
which sweeps before it plans. A Redis write that failed after PostgreSQL committed may or may
not have happened, and a Redis restarted from its AOF would serve what it had before the
outage, so those keys are recorded too. Each process also keeps its own list in memory, which
needs no PostgreSQL and is flushed before the process uses Redis again. Until a sweep, other
processes' get_node() and latest_checkpoint() may still serve the old copy; lists and
executions always come from PostgreSQL.

Fencing: PostgreSQL decides (executions and their fences live there). The batch's keys are
deleted from Redis before PostgreSQL is written, as above, and only the versions PostgreSQL
accepted are written to Redis after: a version it refused is never served from Redis.
Worker liveness records (TracksWorkers) live in PostgreSQL only, like executions.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from enum import Enum
from typing import Any, Literal, TypeVar
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from ..errors import ConfigError, CorruptRecordError, RecordError, StoreError, StoreUnavailableError
from ..nodes import Execution, ExecutionNode, ExecutionStatus
from ._common import mask_url
from .base import Fenced, RejectedRecord, Updates, WorkerRecord
from .redis import ACCEPTED_PARAMS, RedisStore
from .tiered_durable import DurableSideRecords, DurableTier

__all__ = ["TieredStore", "parse_tiered_url"]

log = logging.getLogger(__name__)

REDIS_RETRY_S = 1.0  # after a Redis failure, skip Redis this long before trying it again
MAX_PENDING_EVICTIONS = 100_000  # past this many missed keys, flush the whole prefix instead
SWEEP_PAGE = 1000  # records of missed keys read and deleted per round trip
SWEEP_WARN_EVERY_S = 60.0
_DURABLE_SCHEMES = ("postgresql", "postgresql+psycopg", "postgres")

T = TypeVar("T")


class _Skip(Enum):
    SKIPPED = "skipped"  # Redis was not asked, or failed: use PostgreSQL


SKIPPED = _Skip.SKIPPED


def parse_tiered_url(url: str) -> tuple[str, str]:
    """Split a tiered URL into (redis url, durable url); ConfigError says what is accepted."""
    parts = urlsplit(url)
    shown = mask_url(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))
    if parts.scheme not in ("tiered+redis", "tiered+rediss"):
        raise ConfigError(f"Tiered store URL must start with tiered+redis:// or "
                          f"tiered+rediss://, got {shown!r}.")
    durable: list[str] = []
    rest: list[str] = []
    # Split by hand rather than parse_qsl: that turns '+' into ' ', and an unencoded
    # 'postgresql+psycopg' would silently become another scheme.
    for item in filter(None, parts.query.split("&")):
        key, _, value = item.partition("=")
        if key == "durable":
            durable.append(unquote(value))
        else:
            rest.append(item)
    accepted = f"durable=<URL-encoded postgresql url>, {ACCEPTED_PARAMS}"
    for item in rest:
        key = unquote(item.partition("=")[0])
        if key not in ("prefix", "socket_timeout"):
            raise ConfigError(f"Unknown parameter {key!r} in tiered store URL {shown!r}. "
                              f"Accepted: {accepted}. URL-encode the durable URL (quote(url, "
                              "safe='')) so its own '&' and '?' stay inside it.")
    if len(durable) != 1:
        raise ConfigError(f"Tiered store URL {shown!r} needs exactly one durable=<URL-encoded "
                          f"postgresql url>, got {len(durable)}. Accepted: {accepted}.")
    scheme = urlsplit(durable[0]).scheme.lower()
    if scheme not in _DURABLE_SCHEMES:
        raise ConfigError(f"The durable tier of {shown!r} must be a PostgreSQL URL "
                          f"(postgresql+psycopg://user@host:5432/db), got scheme {scheme!r}.")
    redis_url = urlunsplit((parts.scheme.removeprefix("tiered+"), parts.netloc, parts.path,
                            "&".join(rest), parts.fragment))
    return redis_url, durable[0]


class TieredStore(DurableSideRecords):
    """The Store protocol on Redis (hot) over PostgreSQL (of record).

    Raises StoreUnavailableError when PostgreSQL cannot be reached; never because of Redis.
    `redis_failures` counts Redis calls that failed, `redis_outages` the times Redis went
    from answering to failing.
    """

    def __init__(self, url: str) -> None:
        redis_url, durable_url = parse_tiered_url(url)
        self.hot = RedisStore(redis_url)
        self.durable = DurableTier(durable_url)
        sep = "&" if "?" in self.hot.url else "?"
        self.url = f"tiered+{self.hot.url}{sep}durable={quote(mask_url(durable_url), safe='')}"
        self.redis_failures = 0
        self.redis_outages = 0
        self._reset_process_state()

    def __repr__(self) -> str:
        return f"TieredStore({self.url!r})"

    def _reset_process_state(self) -> None:
        # Per process: a forked child has failed no write, and must not inherit a lock
        # some parent thread held at the moment of the fork.
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._down = False
        self._retry_at = 0.0
        self._evict_nodes: set[str] = set()
        self._evict_checkpoints: set[str] = set()
        self._evict_all = False
        self._sweep_warned_at = -SWEEP_WARN_EVERY_S

    # -- the Redis side: best effort ----------------------------------------------------

    def _redis(self, action: Callable[[RedisStore], T]) -> T | Literal[_Skip.SKIPPED]:
        """Run `action` on Redis, or return SKIPPED if Redis is down or fails."""
        if self._pid != os.getpid():
            self._reset_process_state()
        if self._down and time.monotonic() < self._retry_at:
            return SKIPPED
        try:
            if self._flush_evictions():
                # Back from an outage: other processes may have missed writes too.
                self._sweep_records()
            result = action(self.hot)
        except (StoreError, RecordError) as exc:
            self._note_failure(exc)
            return SKIPPED
        if self._down:
            self._down = False
            log.info("Redis tier of %s answers again; using it.", self.url)
        return result

    def _note_failure(self, exc: Exception) -> None:
        with self._lock:
            self.redis_failures += 1
            first = not self._down
            self._down = True
            self._retry_at = time.monotonic() + REDIS_RETRY_S
            if first:
                self.redis_outages += 1
        if first:
            log.warning("Redis tier of %s failed (%s). Writes go to PostgreSQL only and reads "
                        "fall back to it until Redis answers again.", self.url, exc)

    @contextmanager
    def _forgetting_on_error(self, **keys: Iterable[str]) -> Iterator[None]:
        """A PostgreSQL write that raised may still have committed (the error can be about
        the reply): Redis must then stop serving the copy from before it."""
        try:
            yield
        except Exception:
            self._forget(**keys)
            raise

    def _forget(self, *, nodes: Iterable[str] = (), checkpoints: Iterable[str] = ()) -> None:
        """Remember keys whose Redis copy may be stale, to delete before Redis is used again."""
        with self._lock:
            self._evict_nodes.update(nodes)
            self._evict_checkpoints.update(checkpoints)
            if len(self._evict_nodes) + len(self._evict_checkpoints) > MAX_PENDING_EVICTIONS:
                self._evict_all = True
                self._evict_nodes.clear()
                self._evict_checkpoints.clear()

    def _flush_evictions(self) -> bool:
        """Delete the keys this process missed; True if there were any."""
        # Under the lock, so no thread of this process reads a key that is about to go.
        with self._lock:
            if self._evict_all:
                log.warning("Redis tier of %s missed too many writes to list; dropping every "
                            "key of its prefix so that nothing stale is served.", self.url)
                self.hot.evict_all()
                self._evict_all = False
                return True
            if self._evict_nodes or self._evict_checkpoints:
                self.hot.evict(nodes=self._evict_nodes, checkpoints=self._evict_checkpoints)
                self._evict_nodes.clear()
                self._evict_checkpoints.clear()
                return True
            return False

    def sweep_hot_tier(self) -> int:
        """Delete from Redis the keys recorded in PostgreSQL as missed, by any process on
        this prefix, then the records. Returns how many were swept: 0 when there were none or
        either tier could not be reached (the records then wait for the next sweep). The
        recovery tick runs it before it plans, so it never plans from a stale copy."""
        swept = self._redis(lambda _hot: self._sweep_records())
        return 0 if swept is SKIPPED else swept

    def _sweep_records(self) -> int:
        # Redis errors go up to _redis(), which marks Redis down; PostgreSQL errors end this
        # sweep. Either way the records stay for the next one.
        prefix, swept = self.hot.keys.prefix, 0
        while True:
            try:
                records = self.durable.missed(prefix, limit=SWEEP_PAGE)
            except StoreError as exc:
                return self._sweep_stopped(exc, swept)
            if not records:
                return swept
            self.hot.evict(nodes=[key for _, kind, key in records if kind == "node"],
                           checkpoints=[key for _, kind, key in records if kind == "checkpoint"])
            try:
                self.durable.drop_missed([record_id for record_id, _, _ in records])
            except StoreError as exc:
                return self._sweep_stopped(exc, swept)
            swept += len(records)

    def _sweep_stopped(self, exc: StoreError, swept: int) -> int:
        # Once a minute at most: the recovery tick sweeps every few seconds, and a schema
        # not yet migrated to version 2 would fail every sweep the same way.
        now = time.monotonic()
        if now - self._sweep_warned_at >= SWEEP_WARN_EVERY_S:
            self._sweep_warned_at = now
            log.warning("Tiered store %s could not sweep the Redis keys recorded as missed "
                        "(%s); the next sweep will try again.", self.url, exc)
        return swept

    # -- nodes ---------------------------------------------------------------------------

    def append(self, nodes: Sequence[ExecutionNode]) -> Fenced:
        """PostgreSQL first (StoreUnavailableError if it is down), then Redis."""
        return self._write(nodes, self.durable.append)

    def write(self, nodes: Sequence[ExecutionNode], updates: Updates) -> Fenced:
        """As append(), but PostgreSQL's write() (which may let a version replace the one it
        supersedes) takes the execution changes in the same transaction (executions live
        there only). PostgreSQL's fence decides; Redis gets only the versions it accepted."""
        return self._write(nodes, lambda batch: self.durable.write(batch, updates))

    def _write(self, nodes: Sequence[ExecutionNode],
               durable_write: Callable[[list[ExecutionNode]], Fenced]) -> Fenced:
        if not (batch := list(nodes)):
            return durable_write(batch)
        stale = {"nodes": {n.id for n in batch},
                 "checkpoints": {n.execution_id for n in batch if n.checkpoint is not None}}
        evicted = self._redis(lambda r: r.evict(**stale)) is not SKIPPED
        if not evicted:
            # Recorded before the write: once it commits, Redis's copies are stale, and this
            # process may die before it can delete them.
            self._record_missed(stale, before_write=True)
        with self._forgetting_on_error(**stale):
            fenced = durable_write(batch)
        # The keys of refused versions were deleted above like the rest: Redis falls back to
        # what PostgreSQL holds for them.
        accepted = [n for n in batch if n.id not in fenced.nodes]
        if accepted and self._redis(lambda r: r.append(accepted)) is SKIPPED and evicted:
            self._record_missed(stale, before_write=False)  # (else recorded already)
        return fenced

    def _record_missed(self, stale: dict[str, set[str]], *, before_write: bool) -> None:
        """Remember keys whose Redis copy may be stale: in memory, and in PostgreSQL, which
        outlives this process."""
        self._forget(**stale)
        try:
            self.durable.record_missed(self.hot.keys.prefix, **stale)
        except StoreUnavailableError:
            if before_write:
                raise  # PostgreSQL is down: the write would fail too (the engine retries it)
            log.warning("Tiered store %s: PostgreSQL went away before the Redis keys of a "
                        "write Redis missed could be recorded; this process alone remembers "
                        "them.", self.url)
        except StoreError as exc:  # a schema before version 2: `livingai-tasks migrate`
            log.warning("Tiered store %s could not record the Redis keys of a write Redis "
                        "missed (%s); this process alone remembers them.", self.url, exc)

    def get_node(self, node_id: str) -> ExecutionNode | None:
        hit = self._redis(lambda r: _verified(lambda: r.get_node(node_id),
                                              lambda: r.evict(nodes=[node_id])))
        if hit is not SKIPPED and hit is not None:
            return hit
        return self.durable.get_node(node_id)

    def node_versions(self, node_id: str) -> list[ExecutionNode]:
        return self.durable.node_versions(node_id)

    def nodes(self, execution_id: str) -> list[ExecutionNode]:
        return self.durable.nodes(execution_id)

    def latest_checkpoint(self, execution_id: str) -> ExecutionNode | None:
        hit = self._redis(lambda r: _verified(lambda: r.latest_checkpoint(execution_id),
                                              lambda: r.evict(checkpoints=[execution_id])))
        if hit is not SKIPPED and hit is not None:
            return hit
        return self.durable.latest_checkpoint(execution_id)

    # -- executions: PostgreSQL only (see the module docstring) -------------------------

    def put_execution(self, execution: Execution) -> None:
        self.durable.put_execution(execution)

    def create_execution(self, execution: Execution) -> bool:
        return self.durable.create_execution(execution)

    def update_execution(self, execution_id: str, **changes: Any) -> bool:
        return self.durable.update_execution(execution_id, **changes)

    def get_execution(self, execution_id: str) -> Execution | None:
        return self.durable.get_execution(execution_id)

    def list_executions(
        self,
        *,
        status: ExecutionStatus | None = None,
        lease_expired_before: float | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[Execution]:
        return self.durable.list_executions(status=status,
                                            lease_expired_before=lease_expired_before,
                                            limit=limit, offset=offset)

    def claim(self, execution_id: str, *, fence: int, owner: str, lease_s: float,
              now: float | None = None) -> bool:
        return self.durable.claim(execution_id, fence=fence, owner=owner, lease_s=lease_s,
                                  now=now)

    # -- worker liveness: PostgreSQL only, like executions ------------------------------

    def beat_worker(self, worker: str, *, expires_at: float, owners: Sequence[str],
                    holding: Sequence[str], counters: Mapping[str, float] | None = None
                    ) -> None:
        self.durable.beat_worker(worker, expires_at=expires_at, owners=owners,
                                 holding=holding, counters=counters)

    def workers(self, limit: int = 1000) -> list[WorkerRecord]:
        return self.durable.workers(limit)

    def dead_workers(self, now: float, limit: int = 100) -> list[WorkerRecord]:
        return self.durable.dead_workers(now, limit)

    def worker(self, worker: str) -> WorkerRecord | None:
        return self.durable.worker(worker)

    def forget_worker(self, worker: str) -> None:
        self.durable.forget_worker(worker)

    def set_aside(self, kind: str, execution_id: str, node_id: str | None, payload: bytes,
                  reason: str) -> None:
        self.durable.set_aside(kind, execution_id, node_id, payload, reason)  # PostgreSQL

    def rejected(self, limit: int = 100) -> list[RejectedRecord]:
        return self.durable.rejected(limit)

    # -- upkeep --------------------------------------------------------------------------

    def migrate(self) -> None:
        """Migrate the PostgreSQL tier (Redis has no schema)."""
        self.durable.migrate()

    def close(self) -> None:
        """Delete the Redis copies this process could not (writes Redis missed), then close
        both tiers. Idempotent."""
        try:
            self._evict_before_leaving()
            self.durable.close()
        finally:
            self.hot.close()

    def _evict_before_leaving(self) -> None:
        # Once this process is gone, only the records in PostgreSQL say which keys it missed,
        # and a Redis that answers again would serve their old copies until the next sweep.
        # So try now, whatever the retry window says. A forked child that never used the
        # store failed no write (and must not take a lock a parent thread held at the fork).
        if self._pid != os.getpid():
            return
        try:
            if self._flush_evictions():  # a no-op when nothing was missed
                self._sweep_records()
        except Exception as exc:  # noqa: BLE001 - closing must not fail on a best effort
            log.error("Redis tier of %s: the keys it missed could not be deleted before "
                      "closing (%s); they stay recorded in PostgreSQL, and Redis may serve "
                      "their previous copies until the next sweep (the recovery tick's).",
                      self.url, exc)


def _verified(read: Callable[[], ExecutionNode | None],
              evict: Callable[[], None]) -> ExecutionNode | None:
    """A corrupt Redis copy is a miss, not an outage: it is evicted (logged) and the read
    goes on to PostgreSQL, which holds the good version."""
    try:
        return read()
    except CorruptRecordError as exc:
        log.error("Evicting a corrupt Redis copy; reading PostgreSQL instead: %s", exc)
        evict()
        return None
