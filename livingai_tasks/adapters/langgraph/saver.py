"""LangGraph checkpoints in a livingai_tasks store: `LivingAISaver`, a BaseCheckpointSaver.

Storage: the store's side records (stores.base.KeepsSideRecords: SQLite, PostgreSQL, Redis,
tiered, memory), space "langgraph", one group per thread. Record keys are JSON arrays, so no
namespace or id (LangGraph's namespaces contain "|" and ":") can be mistaken for another:

    ["c", ns, checkpoint_id]               -> {"cp": typed, "md": typed, "parent": id, "run": id}
    ["w", ns, checkpoint_id, task_id, idx] -> {"ch": channel, "v": typed, "path": task_path}

"typed" is the serializer's (type, bytes) pair with the bytes in base64. Channel values stay
inside their checkpoint (no separate blob records): a checkpoint is read whole anyway.

Each read loads its thread's group once: the latest checkpoint needs every checkpoint id of
the thread, and `prune()` keeps a long-lived thread's group small. Listing across threads and
`delete_for_runs()` visit every thread of the space: fine for maintenance, not a hot path.

Serialization never unpickles: LangGraph's JsonPlusSerializer with pickle_fallback=False and
strict msgpack (allowed_msgpack_modules=None: LangGraph's safe types, plus the types a
compiled graph declares in its state, which LangGraph passes on through with_allowlist()).
Pass `allowed_modules` for more; a type outside them is returned as its serialized data with
a warning by LangGraph, never constructed.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
    get_checkpoint_metadata,
)
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer

from ...errors import ConfigError
from ...stores.base import KeepsSideRecords
from . import _framework  # noqa: F401  (the missing-extra error)

__all__ = ["LivingAISaver", "SPACE", "safe_serializer"]

SPACE = "langgraph"  # the side-records space of every thread's checkpoints


def safe_serializer(allowed_modules: Iterable[tuple[str, ...]] = ()) -> JsonPlusSerializer:
    """LangGraph's serializer, configured never to unpickle and to rebuild only allowed
    types (LangGraph's safe ones plus `allowed_modules`, e.g. ("myapp.state", "Order"))."""
    extra = [tuple(m) for m in allowed_modules]
    return JsonPlusSerializer(pickle_fallback=False, allowed_json_modules=None,
                              allowed_msgpack_modules=extra or None)


def _pack(typed: tuple[str, bytes]) -> list[str]:
    return [typed[0], base64.b64encode(typed[1]).decode("ascii")]


def _unpack(packed: list[str]) -> tuple[str, bytes]:
    return packed[0], base64.b64decode(packed[1])


def _key(*parts: str | int) -> str:
    return json.dumps(list(parts), separators=(",", ":"))


class _Thread:
    """One thread's records, decoded from its group: checkpoints by (ns, id), writes by
    (ns, id) -> [(key, record)]."""

    def __init__(self, records: dict[str, bytes]) -> None:
        self.checkpoints: dict[tuple[str, str], dict[str, Any]] = {}
        self.writes: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
        for key, raw in records.items():
            parts = json.loads(key)
            value = json.loads(raw)
            if parts[0] == "c":
                self.checkpoints[(parts[1], parts[2])] = value
            else:
                value["task"], value["idx"] = parts[3], parts[4]
                self.writes.setdefault((parts[1], parts[2]), []).append((key, value))

    def latest(self, ns: str) -> str | None:
        ids = [cid for (n, cid) in self.checkpoints if n == ns]
        return max(ids) if ids else None

    def keys_of(self, ns: str, cid: str) -> list[str]:
        """The keys of a checkpoint and of its writes."""
        return [_key("c", ns, cid)] + [k for k, _ in self.writes.get((ns, cid), [])]


class LivingAISaver(BaseCheckpointSaver[str]):
    """A LangGraph checkpointer over a livingai_tasks store (any store with side records:
    SQLite, PostgreSQL, Redis, tiered). Run the store's `migrate()` once first (the SQL
    stores keep checkpoints in the `lai_side_records` table)."""

    def __init__(self, store: object, *, allowed_modules: Iterable[tuple[str, ...]] = ()
                 ) -> None:
        if not isinstance(store, KeepsSideRecords):
            raise ConfigError(
                f"LivingAISaver needs a store with side records (KeepsSideRecords: "
                f"side_get, side_put, side_delete, side_groups), got {type(store).__name__}; "
                "the SQL, Redis, tiered and memory stores of livingai_tasks have them.")
        super().__init__(serde=safe_serializer(allowed_modules))
        self.store = store

    def get_next_version(self, current: str | None, channel: None) -> str:
        # Versions compare as strings: a zero-padded counter, then a random tail so two
        # forks of one thread never produce the same version for different values.
        number = 0 if current is None else int(str(current).split(".")[0])
        return f"{number + 1:032}.{random.random():016}"

    # -- reading ----------------------------------------------------------------------

    def _thread(self, thread_id: str) -> _Thread:
        return _Thread(self.store.side_get(SPACE, thread_id))

    def _tuple(self, thread_id: str, ns: str, cid: str, thread: _Thread,
               config: RunnableConfig | None = None) -> CheckpointTuple:
        rec = thread.checkpoints[(ns, cid)]
        writes = sorted(thread.writes.get((ns, cid), []),
                        key=lambda kv: (kv[1]["path"], kv[1]["task"], kv[1]["idx"]))
        parent = rec.get("parent")
        return CheckpointTuple(
            config=config or {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                                               "checkpoint_id": cid}},
            checkpoint=self.serde.loads_typed(_unpack(rec["cp"])),
            metadata=self.serde.loads_typed(_unpack(rec["md"])),
            parent_config=({"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                                             "checkpoint_id": parent}} if parent else None),
            pending_writes=[(w["task"], w["ch"], self.serde.loads_typed(_unpack(w["v"])))
                            for _, w in writes],
        )

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        configurable = config["configurable"]
        thread_id = str(configurable["thread_id"])
        ns = configurable.get("checkpoint_ns", "")
        thread = self._thread(thread_id)
        cid = get_checkpoint_id(config)
        if cid:
            if (ns, cid) not in thread.checkpoints:
                return None
            return self._tuple(thread_id, ns, cid, thread, config)
        latest = thread.latest(ns)
        return None if latest is None else self._tuple(thread_id, ns, latest, thread)

    def list(self, config: RunnableConfig | None, *, filter: dict[str, Any] | None = None,
             before: RunnableConfig | None = None, limit: int | None = None
             ) -> Iterator[CheckpointTuple]:
        configurable = config["configurable"] if config else {}
        if "thread_id" in configurable:
            threads = [str(configurable["thread_id"])]
        else:
            threads = self.store.side_groups(SPACE)
        want_ns = configurable.get("checkpoint_ns")
        want_id = get_checkpoint_id(config) if config else None
        before_id = get_checkpoint_id(before) if before else None
        left = limit
        for thread_id in threads:
            thread = self._thread(thread_id)
            for ns, cid in sorted(thread.checkpoints, key=lambda k: k[1], reverse=True):
                if left is not None and left <= 0:
                    return
                if ((want_ns is not None and ns != want_ns) or (want_id and cid != want_id)
                        or (before_id and cid >= before_id)):
                    continue
                found = self._tuple(thread_id, ns, cid, thread)
                if filter and not all(found.metadata.get(k) == v for k, v in filter.items()):
                    continue
                if left is not None:
                    left -= 1
                yield found

    # -- writing ----------------------------------------------------------------------

    def put(self, config: RunnableConfig, checkpoint: Checkpoint,
            metadata: CheckpointMetadata, new_versions: ChannelVersions) -> RunnableConfig:
        configurable = config["configurable"]
        thread_id = str(configurable["thread_id"])
        ns = configurable.get("checkpoint_ns", "")
        full_metadata = get_checkpoint_metadata(config, metadata)
        record = {"cp": _pack(self.serde.dumps_typed(checkpoint)),
                  "md": _pack(self.serde.dumps_typed(full_metadata)),
                  "parent": configurable.get("checkpoint_id"),
                  "run": full_metadata.get("run_id")}
        self.store.side_put(SPACE, thread_id,
                            {_key("c", ns, checkpoint["id"]): json.dumps(record).encode()})
        return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                                 "checkpoint_id": checkpoint["id"]}}

    def put_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                   task_id: str, task_path: str = "") -> None:
        configurable = config["configurable"]
        thread_id = str(configurable["thread_id"])
        ns = configurable.get("checkpoint_ns", "")
        cid = configurable["checkpoint_id"]
        # As LangGraph's own savers: a regular write, once stored, is never replaced (a
        # task re-run after a crash must not change what its first run recorded); the
        # special channels (errors, interrupts...) have fixed negative indexes and are.
        regular: dict[str, bytes] = {}
        special: dict[str, bytes] = {}
        for idx, (channel, value) in enumerate(writes):
            index = WRITES_IDX_MAP.get(channel, idx)
            record = {"ch": channel, "v": _pack(self.serde.dumps_typed(value)),
                      "path": task_path}
            target = special if index < 0 else regular
            target[_key("w", ns, cid, task_id, index)] = json.dumps(record).encode()
        if special:
            self.store.side_put(SPACE, thread_id, special, replace=True)
        if regular:
            self.store.side_put(SPACE, thread_id, regular, replace=False)

    # -- deleting and copying ---------------------------------------------------------

    def delete_thread(self, thread_id: str) -> None:
        self.store.side_delete(SPACE, str(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        runs = set(run_ids)
        if not runs:
            return
        for thread_id in self.store.side_groups(SPACE):
            thread = self._thread(thread_id)
            doomed = [key for (ns, cid), rec in thread.checkpoints.items()
                      if rec.get("run") in runs for key in thread.keys_of(ns, cid)]
            if doomed:
                self.store.side_delete(SPACE, thread_id, doomed)

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        records = self.store.side_get(SPACE, str(source_thread_id))
        self.store.side_put(SPACE, str(target_thread_id), records)

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        if strategy not in ("keep_latest", "delete"):
            raise ConfigError(f"prune strategy {strategy!r} is not one of 'keep_latest', "
                              "'delete'")
        for thread_id in thread_ids:
            if strategy == "delete":
                self.store.side_delete(SPACE, str(thread_id))
                continue
            thread = self._thread(str(thread_id))
            keep = {(ns, thread.latest(ns)) for ns, _ in thread.checkpoints}
            doomed = [key for ns, cid in thread.checkpoints if (ns, cid) not in keep
                      for key in thread.keys_of(ns, cid)]
            # Writes whose checkpoint is gone (or never was) go with the rest.
            doomed += [k for (ns, cid), ws in thread.writes.items()
                       if (ns, cid) not in keep and (ns, cid) not in thread.checkpoints
                       for k, _ in ws]
            if doomed:
                self.store.side_delete(SPACE, str(thread_id), doomed)

    # -- async: the store is synchronous, so each call runs in a worker thread ---------

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        return await asyncio.to_thread(self.get_tuple, config)

    async def alist(self, config: RunnableConfig | None, *,
                    filter: dict[str, Any] | None = None,
                    before: RunnableConfig | None = None, limit: int | None = None
                    ) -> AsyncIterator[CheckpointTuple]:
        found = await asyncio.to_thread(
            lambda: list(self.list(config, filter=filter, before=before, limit=limit)))
        for item in found:
            yield item

    async def aput(self, config: RunnableConfig, checkpoint: Checkpoint,
                   metadata: CheckpointMetadata, new_versions: ChannelVersions
                   ) -> RunnableConfig:
        return await asyncio.to_thread(self.put, config, checkpoint, metadata, new_versions)

    async def aput_writes(self, config: RunnableConfig, writes: Sequence[tuple[str, Any]],
                          task_id: str, task_path: str = "") -> None:
        await asyncio.to_thread(self.put_writes, config, writes, task_id, task_path)

    async def adelete_thread(self, thread_id: str) -> None:
        await asyncio.to_thread(self.delete_thread, thread_id)

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        await asyncio.to_thread(self.delete_for_runs, run_ids)

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        await asyncio.to_thread(self.copy_thread, source_thread_id, target_thread_id)

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest"
                     ) -> None:
        await asyncio.to_thread(self.prune, thread_ids, strategy=strategy)
