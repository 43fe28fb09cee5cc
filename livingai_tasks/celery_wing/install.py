"""install(app): the one wiring call; start(canvas): run a canvas as one recorded execution."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from celery import Celery, group
from celery.app.defaults import DEFAULTS
from celery.result import AsyncResult

from ..errors import ConfigError, NotJSONSerializableError
from ..nodes import Execution, ExecutionNode, ExecutionStatus, Meta, dumps_json, new_id
from ..settings import Settings
from ..stores import Store, mask_url
from . import context, runtime, signals, tasks
from .config_guard import hide_store_secret, refuse_unsafe_serializers
from .journal_resolve import resolve as _resolve
from .messages import StepIdentity

__all__ = ["install", "start", "resolve", "Run", "CELERY_SETTINGS"]

log = logging.getLogger("livingai_tasks")

# Worker-wide settings steps need for crash safety (per-step ones live on StepTask).
CELERY_SETTINGS = {
    "worker_prefetch_multiplier": 1,  # a prefetched step waits unacked: long steps + VT = dupes
}
# Monitoring is left to the deployment, because it costs every step and crash safety does
# not need it: worker_send_task_events (three event publishes per step, about 6 % of a
# fleet's throughput at 20 ms steps; Flower turns it on by itself for the workers it
# watches, and workers/celeryconfig.py sets it from the start), task_send_sent_event (one more
# publish), task_track_started (one more result-backend write) and result_extended (the
# step's arguments stored again with its result). See loadtest/README.md, fleet.


def _set_defaults(app: Celery) -> None:
    """Our defaults, only where the app still has Celery's own: a value the user chose
    (say prefetch 4 for short steps) stays, and we say so when it weakens crash safety."""
    for key, value in CELERY_SETTINGS.items():
        current = app.conf.get(key)
        if current == DEFAULTS.get(key):
            app.conf[key] = value
        elif current != value:
            log.info("livingai_tasks: keeping %s=%r from the app's config (recommended: %r)",
                     key, current, value)


def install(app: Celery, *, store: str | Store | None = None, **settings: Any) -> Settings:
    """Wire livingai_tasks into a Celery app; call it where the app is defined, so that the
    client, every worker and beat run it. Idempotent. Returns the resolved settings.

    `store` is a URL (each process then opens its own connection to it) or a Store
    instance (a store of your own: it is used as it is in every process, so it must
    survive a fork, e.g. by connecting lazily and again in a child).
    Settings come from the keywords, the app's config (`livingai_<name>`), the environment
    (`LIVINGAI_<NAME>`), then defaults (see settings.py). A bad value raises ConfigError
    here. Nothing connects to the store until it is first used (after fork, in workers).
    """
    if not isinstance(app, Celery):
        raise ConfigError(f"install() takes a Celery app, got {type(app).__name__}.")
    instance = store if isinstance(store, Store) else None
    if store is not None and instance is None and not isinstance(store, str):
        raise ConfigError(f"install(store=...) takes a store URL or a livingai_tasks.Store "
                          f"instance, got {type(store).__name__}.")
    conf = hide_store_secret(app.conf)
    resolved = Settings.resolve(conf, store=None if instance else store, **settings)
    if instance is not None:
        resolved = resolved.with_store_url(instance.url)
    refuse_unsafe_serializers(app.conf, "at install()")
    _set_defaults(app)
    runtime.configure(resolved, app, instance)
    signals.connect()
    tasks.register(app, resolved)
    log.debug("livingai_tasks installed: store %s, budget %s ms", mask_url(resolved.store),
              resolved.budget_ms)
    return resolved


@dataclass(frozen=True)
class Run:
    """A started execution: its id, and Celery's result for the canvas's final step(s)."""

    execution_id: str
    result: AsyncResult

    def get(self, timeout: float | None = None, **kwargs: Any) -> Any:
        return self.result.get(timeout=timeout, **kwargs)

    def execution(self) -> Execution | None:
        return runtime.get().engine.store.get_execution(self.execution_id)

    def nodes(self) -> list[ExecutionNode]:
        return runtime.get().engine.store.nodes(self.execution_id)


def start(signature: Any, *, execution_id: str | None = None,
          metadata: dict[str, Any] | None = None, **apply_options: Any) -> Run:
    """Publish a step, chain, group or chord as one execution. Its record is created
    durably before the first message leaves, so a crash right after still leaves a trace.

    All or nothing: if start() raises (the broker refused the publish, a serializer
    failed), the execution is recorded CANCELLED with the reason and never runs later, so
    retrying start() cannot run it twice. (Only if the store also fails at that moment is
    it left for recovery, which is logged.) `execution_id` names the execution; a second
    start() with the same one raises ConfigError instead of starting another."""
    if not hasattr(signature, "apply_async"):
        raise ConfigError(
            f"start() takes a Celery signature or canvas (task.s(...), chain(...), group(...), "
            f"chord(...)), got {type(signature).__name__}."
        )
    rt = runtime.get()
    execution_id = execution_id or new_id()
    metadata = dict(metadata or {})
    # Frozen now, its task ids are fixed: recovery can publish the very same canvas again if
    # its first message is lost before any step starts (a worker killed holding it).
    # (Not in eager mode: nothing there can be lost, and freezing changes what Celery's
    # eager chain returns.)
    frozen = not signature.app.conf.task_always_eager
    if frozen:
        signature.freeze()
        try:
            dumps_json(dict(signature), what="canvas")
            metadata[Meta.CANVAS] = dict(signature)
        except NotJSONSerializableError:  # e.g. a datetime eta: only steps can be resumed
            log.debug("livingai_tasks: canvas of %s is not JSON; not kept for recovery",
                      execution_id)
    if isinstance(signature, group):
        if not frozen:
            signature.freeze()  # the group id: its last member completes the execution
        metadata[Meta.GROUP_SIZES] = {signature.id: len(signature.tasks)}
    # Until its first step starts nobody renews this lease: if none ever starts, recovery
    # finds the execution when it expires.
    created = rt.engine.create_execution(
        Execution(id=execution_id, status=ExecutionStatus.RUNNING, metadata=metadata,
                  lease_deadline=time.time() + rt.settings.stuck_after_s)
    )
    if not created:
        raise ConfigError(f"Execution {execution_id!r} already exists; pass a new execution_id "
                          "or omit it.")
    context.local.publish = StepIdentity(execution_id)
    try:
        result = signature.apply_async(**apply_options)
    except BaseException as exc:
        _abandon(rt, execution_id, exc)
        raise
    finally:
        context.local.publish = None
    return Run(execution_id, result)


def _abandon(rt: runtime.Runtime, execution_id: str, exc: BaseException) -> None:
    """start() raised after creating the record: take the execution out of recovery's
    reach, so that a caller who retries start() does not get a second run besides."""
    reason = f"start() failed to publish: {type(exc).__name__}: {exc}"
    try:
        rt.engine.update_execution(execution_id, durable=True, status=ExecutionStatus.CANCELLED,
                                   reason=reason[:1000], lease_deadline=None)
    except Exception:  # noqa: BLE001 - the publish error is the one to raise
        log.exception("livingai_tasks: could not mark execution %s cancelled after start() "
                      "failed; recovery may publish it once its lease expires", execution_id)


def resolve(execution_id: str, node_id: str, *, output: Any = None, done: bool = False,
            retry: bool = False, owner: str = "operator", force: bool = False) -> ExecutionNode:
    """Decide an IN_DOUBT tool step: `done=True, output=...` if its side effect happened
    (the rest of the canvas then runs with that output), `retry=True` if it did not (it
    runs again, with the same idempotency key). `node_id` may name a journaled call (see
    lai.call) that holds its step: then `output` is the call's result, and the step runs
    again from its journal. Raises ResolveError if it is not held, or
    if retry is asked while its last attempt's worker may still be alive (force=True if
    you know it is dead)."""
    rt = runtime.get()
    return _resolve(rt.app, rt.engine.store, execution_id, node_id, output=output, done=done,
                    retry=retry, owner=owner, force=force)
