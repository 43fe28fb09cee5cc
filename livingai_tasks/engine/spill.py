"""Spill: the disk tail of the write-behind queue, when its memory head is full.

When the store is down or slower than the agents, the queue's memory part fills up
(`queue_max` writes). With `queue_full="spill"` (the default) the writes that do not fit go
to a file on local disk instead of being dropped or holding the agent, and every later write
goes behind them (the queue is then "memory head + disk tail", still one order); the writer
reads them back in order as room frees up, and deletes each once the store has it. Like the
disk buffers of log shippers, this trades disk for never losing a write to a slow store.

The file is SQLite (one table, rows in queue order, each with a CRC-32 of its content): its
transactions give a file that is never half-appended after a crash, which an append-only
file of our own would need a recovery scan for. Records round-trip exactly: node JSON plus
its encoded checkpoint blob, execution JSON, or the changes of an update as tagged JSON
(datetimes as ISO strings); never pickle, so a spill file is data, not code.
synchronous=NORMAL: a spill survives the process (SIGKILL, OOM kill) but not a power cut.

One file per process (`<pid>-<ns>.spill`) in `<spill_dir>/<hash of the store URL>/`, each
with a `.lock` file the process holds an flock on while it lives. An engine whose writer
starts claims every file of the same store whose lock it can take (its process is gone) and
drains it after its own spill, so a worker restarted on the same host sends what its
predecessor spilled; two live processes never drain the same file (the flock). Order is
kept within a file, not across processes (their writes were never ordered).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from ..nodes import Execution, ExecutionNode, ExecutionStatus
from .queued_write import QueuedWrite

__all__ = ["Spill", "SpillSegment", "spill_folder", "spill_waiting"]

log = logging.getLogger("livingai_tasks.engine")

# AUTOINCREMENT: a plain rowid restarts at max(id) + 1, so once the store has taken every row
# a new row would get an id at or below the read cursor and never be read back.
_SCHEMA = ("CREATE TABLE IF NOT EXISTS spill (id INTEGER PRIMARY KEY AUTOINCREMENT, "
           "seq INTEGER NOT NULL, "
           "kind TEXT NOT NULL, execution_id TEXT NOT NULL, body TEXT NOT NULL, blob BLOB, "
           "crc INTEGER NOT NULL)")


def spill_folder(spill_dir: str, store_url: str) -> Path:
    """Where the spill files of one store live: one folder per store URL, so that an engine
    never drains into a store what was spilled for another."""
    digest = hashlib.sha256(store_url.encode()).hexdigest()[:16]
    return Path(spill_dir) / digest


def spill_waiting(spill_dir: str, store_url: str) -> bool:
    """Whether any spill file of this store is in spill_dir (this process's, or one to claim)."""
    folder = spill_folder(spill_dir, store_url)
    return folder.is_dir() and any(folder.glob("*.spill.lock"))


def _crc(kind: str, execution_id: str, body: str, blob: bytes | None) -> int:
    crc = zlib.crc32(f"{kind}\0{execution_id}\0".encode())
    crc = zlib.crc32(body.encode(), crc)
    return zlib.crc32(blob or b"", crc)


def _changes_json(changes: dict[str, Any]) -> str:
    def tag(value: Any) -> Any:
        if isinstance(value, dt.datetime):
            return {"$datetime": value.isoformat()}
        if isinstance(value, ExecutionStatus):
            return value.value
        return value
    return json.dumps({name: tag(value) for name, value in changes.items()},
                      separators=(",", ":"))


def _changes_from_json(body: str) -> dict[str, Any]:
    changes: dict[str, Any] = json.loads(body)
    for name, value in changes.items():
        if isinstance(value, dict) and value.keys() == {"$datetime"}:
            changes[name] = dt.datetime.fromisoformat(value["$datetime"])
    if "status" in changes:
        changes["status"] = ExecutionStatus(changes["status"])
    return changes


def _row_of(op: QueuedWrite) -> tuple[str, str, str, bytes | None]:
    """(kind, execution_id, body, blob) of a write whose state is already encoded."""
    if op.kind == "append":
        node = cast(ExecutionNode, op.node)
        return op.kind, op.execution_id, node.to_json(), node.checkpoint
    if op.kind == "put":
        return op.kind, op.execution_id, cast(Execution, op.execution).to_json(), None
    return op.kind, op.execution_id, _changes_json(op.changes), None


def _op_of(kind: str, execution_id: str, body: str, blob: bytes | None) -> QueuedWrite:
    if kind == "append":
        node = ExecutionNode.from_json(body, checkpoint=blob)
        op = QueuedWrite("append", execution_id, len(body) + len(blob or b""), node=node)
        op.json_size = len(body)
        return op
    if kind == "put":
        execution = Execution.from_dict(json.loads(body))
        return QueuedWrite("put", execution_id, len(body), execution=execution)
    return QueuedWrite("update", execution_id, len(body) + 256, changes=_changes_from_json(body))


class SpillSegment:
    """One spill file and the flock that makes it this process's. Not thread-safe: the
    Spill that owns it serialises its use."""

    def __init__(self, path: Path, lock_fd: int) -> None:
        self.path = path
        self.lock_fd = lock_fd
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(_SCHEMA)
        self.cursor = -(2**62)  # rows with id <= cursor were read back into memory
        row = self._db.execute("SELECT count(*), coalesce(sum(length(body) + "
                               "coalesce(length(blob), 0)), 0) FROM spill").fetchone()
        self.rows, self.bytes = int(row[0]), int(row[1])
        self.unread = self.rows

    def append(self, op: QueuedWrite) -> int:
        kind, eid, body, blob = _row_of(op)
        self._db.execute("INSERT INTO spill (seq, kind, execution_id, body, blob, crc) "
                         "VALUES (?, ?, ?, ?, ?, ?)",
                         (op.seq, kind, eid, body, blob, _crc(kind, eid, body, blob)))
        size = len(body) + len(blob or b"")
        self.rows += 1
        self.unread += 1
        self.bytes += size
        return size

    def read(self, limit: int, on_corrupt: Callable[[int, str], None]) -> list[QueuedWrite]:
        """The next `limit` unread rows as writes (spill_row set), oldest first."""
        rows = self._db.execute("SELECT id, seq, kind, execution_id, body, blob, crc FROM spill "
                                "WHERE id > ? ORDER BY id LIMIT ?", (self.cursor, limit)).fetchall()
        ops: list[QueuedWrite] = []
        for row_id, seq, kind, eid, body, blob, crc in rows:
            self.cursor = row_id
            self.unread -= 1
            blob = bytes(blob) if blob is not None else None
            if _crc(kind, eid, body, blob) != crc:
                on_corrupt(row_id, f"CRC mismatch in {self.path} row {row_id} "
                                   f"(execution {eid})")
                self.delete_through(row_id, only=row_id)
                continue
            try:
                op = _op_of(kind, eid, body, blob)
            except (ValueError, KeyError, TypeError) as exc:
                on_corrupt(row_id, f"{self.path} row {row_id} (execution {eid}): {exc}")
                self.delete_through(row_id, only=row_id)
                continue
            op.seq = seq
            op.spill = (self, row_id)
            ops.append(op)
        return ops

    def delete_through(self, row_id: int, *, only: int | None = None) -> None:
        """Forget rows the store has (ids <= row_id), or the one row `only`."""
        where, args = ("id = ?", (only,)) if only is not None else ("id <= ?", (row_id,))
        row = self._db.execute(f"SELECT count(*), coalesce(sum(length(body) + "
                               f"coalesce(length(blob), 0)), 0) FROM spill WHERE {where}",
                               args).fetchone()
        self._db.execute(f"DELETE FROM spill WHERE {where}", args)
        self.rows -= int(row[0])
        self.bytes -= int(row[1])

    def put_first(self, ops: list[QueuedWrite]) -> None:
        """Write `ops` (in order) ahead of every row still here: the memory head of a queue
        that closes with the store still down. Rows some of them were read from go."""
        first = self._db.execute("SELECT min(id) FROM spill").fetchone()[0]
        start = (first if first is not None else 1) - len(ops) - 1
        self._db.execute("BEGIN")
        try:
            for i, op in enumerate(ops):
                if op.spill is not None and op.spill[0] is self:
                    self._db.execute("DELETE FROM spill WHERE id = ?", (op.spill[1],))
                kind, eid, body, blob = _row_of(op)
                self._db.execute("INSERT INTO spill (id, seq, kind, execution_id, body, blob, "
                                 "crc) VALUES (?, ?, ?, ?, ?, ?, ?)",
                                 (start + i, op.seq, kind, eid, body, blob,
                                  _crc(kind, eid, body, blob)))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        row = self._db.execute("SELECT count(*), coalesce(sum(length(body) + "
                               "coalesce(length(blob), 0)), 0) FROM spill").fetchone()
        self.rows, self.bytes = int(row[0]), int(row[1])

    def close(self, *, remove: bool) -> None:
        self._db.close()
        if remove:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{self.path}{suffix}")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{self.path}.lock")
        os.close(self.lock_fd)


_spills: weakref.WeakSet[Spill] = weakref.WeakSet()


class Spill:
    """The disk tail of one write-behind queue: its own file (created on the first spill)
    and the files of dead processes it claimed, drained after it. Thread-safe (own lock)."""

    def __init__(self, spill_dir: str, store_url: str) -> None:
        self.folder = spill_folder(spill_dir, store_url)
        self._lock = threading.Lock()
        self.own: SpillSegment | None = None
        self.adopted: list[SpillSegment] = []
        _spills.add(self)

    # -- state (read without the lock: ints, for gauges and a lock-free peek) --------------
    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in (self.own, *self.adopted) if s is not None)

    @property
    def own_unread(self) -> int:
        return self.own.unread if self.own is not None else 0

    @property
    def unread(self) -> int:
        return self.own_unread + sum(s.unread for s in self.adopted)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in (self.own, *self.adopted) if s is not None)

    # -- writing -------------------------------------------------------------------------
    def append(self, op: QueuedWrite) -> int:
        """Spill `op` (state already encoded) behind every spilled write; its size (bytes).
        OSError or sqlite3.Error if the disk refuses."""
        with self._lock:
            if self.own is None:
                self.own = self._create()
            return self.own.append(op)

    def put_first(self, ops: list[QueuedWrite]) -> None:
        with self._lock:
            if self.own is None:
                self.own = self._create()
            self.own.put_first(ops)

    def read(self, limit: int, on_corrupt: Callable[[int, str], None]) -> list[QueuedWrite]:
        """Up to `limit` spilled writes, oldest first: this process's own, else a claimed
        file's."""
        with self._lock:
            if self.own is not None and self.own.unread:
                return self.own.read(limit, on_corrupt)
            for segment in self.adopted:
                if segment.unread:
                    return segment.read(limit, on_corrupt)
            return []

    def written(self, segment: SpillSegment, row_id: int) -> None:
        """The store has every row of `segment` up to `row_id`: delete them, and a claimed
        file once it is empty."""
        with self._lock:
            if segment is not self.own and segment not in self.adopted:
                return  # closed meanwhile
            segment.delete_through(row_id)
            if segment is not self.own and segment.rows == 0 and segment.unread == 0:
                self.adopted.remove(segment)
                segment.close(remove=True)
                log.info("Drained the spill file %s a previous process left", segment.path)

    # -- claiming the files of dead processes ---------------------------------------------
    def claim_orphans(self) -> int:
        """Claim the spill files of this store whose process is gone; rows claimed."""
        if not self.folder.is_dir():
            return 0
        claimed = 0
        for lock_path in sorted(self.folder.glob("*.spill.lock")):
            path = lock_path.with_suffix("")
            with self._lock:
                if self.own is not None and self.own.path == path:
                    continue
                try:
                    fd = os.open(lock_path, os.O_RDWR)
                except FileNotFoundError:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    os.close(fd)  # its process is alive
                    continue
                if not path.exists() or not lock_path.exists():
                    segment = None  # drained and removed by the process that held it
                else:
                    try:
                        segment = SpillSegment(path, fd)
                    except sqlite3.Error as exc:
                        log.error("Spill file %s cannot be read (%s); left in place", path, exc)
                        os.close(fd)
                        continue
                if segment is None or segment.rows == 0:
                    if segment is not None:
                        segment.close(remove=True)
                    else:
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(lock_path)
                        os.close(fd)
                    continue
                self.adopted.append(segment)
                claimed += segment.rows
                log.warning("Claimed the spill file %s (%d writes) a previous process left; "
                            "draining it into the store", path, segment.rows)
        return claimed

    def _create(self) -> SpillSegment:
        """This process's own file; lock held. Its lock file is flocked before it gets its
        name, so no other process can claim it in between."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        name = f"{os.getpid()}-{time.time_ns()}.spill"
        path = self.folder / name
        temp = self.folder / f".{name}.lock.tmp"
        fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        os.rename(temp, f"{path}.lock")
        return SpillSegment(path, fd)

    def close(self) -> None:
        """Let the files go (an own file that is empty is removed; others stay for the next
        engine to claim)."""
        with self._lock:
            for segment in (self.own, *self.adopted):
                if segment is not None:
                    segment.close(remove=segment.rows == 0)
            self.own, self.adopted = None, []

    def forget_after_fork(self) -> None:
        """In a forked child: close this copy of the parent's lock fds, so a parent that dies
        leaves its files claimable (an flock lives while any copy of its fd is open)."""
        for segment in (self.own, *self.adopted):
            if segment is not None:
                with contextlib.suppress(OSError):
                    os.close(segment.lock_fd)


def _forget_in_child() -> None:
    for spill in list(_spills):
        spill.forget_after_fork()


os.register_at_fork(after_in_child=_forget_in_child)
