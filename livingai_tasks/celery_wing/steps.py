"""@agent_step and @tool_step: ordinary Celery tasks whose runs are recorded as nodes.

Recording is done by signal handlers (signals.py) through the lifecycle (lifecycle.py).
The task base class adds the one thing a signal cannot do: decide whether the body runs at
all. Celery ignores exceptions raised in task_prerun receivers, so skipping a step that
already ran has to happen in __call__, and returning the recorded output from there lets
the chain go on with it.
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

from celery import Celery, Task, shared_task
from celery.exceptions import Ignore, Reject
from celery.utils.saferepr import saferepr

from ..errors import (
    ApprovalDenied,
    ConfigError,
    NotDurableError,
    StepInDoubtError,
    StepRefusedError,
)
from ..nodes import NodeType
from . import context, outcomes
from .context import Decision
from .lifecycle import Reconciled, StepSpec
from .messages import StepIdentity, tag_kwargsrepr
from .waits import Suspended, seconds

__all__ = ["agent_step", "tool_step", "StepTask", "StepSpec", "Reconciled", "spec_of"]

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("livingai_tasks")


class StepTask(Task):  # type: ignore[misc]
    """Base class of every step. Crash-safety defaults: the message is acked after the step
    (a whole-worker crash leaves it with the broker), a killed child is NOT requeued by
    Celery (that loops forever on a step that always OOMs: recovery resumes it instead,
    with a bounded number of attempts), and only JSON crosses the broker."""

    acks_late = True
    reject_on_worker_lost = False
    serializer = "json"
    livingai: StepSpec = StepSpec(NodeType.PROMPT, True)

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                    *rest: Any, **options: Any) -> Any:
        """Celery's apply_async, plus the execution's headers, chosen here rather than in
        before_task_publish: Celery builds its task-sent event before that signal fires,
        and Flower should see the tagged kwargsrepr in every event of the step."""
        headers = dict(options.pop("headers", None) or {})
        identity = StepIdentity.from_headers(headers)  # chosen already (the caller)?
        if identity is None:
            identity = context.publish_identity(task_id)
            headers.update(identity.to_headers() if identity is not None else {})
        if identity is not None and options.get("kwargsrepr") is None:
            shown = saferepr(kwargs or {}, 1024, maxlevels=self.app.conf.task_repr_maxlevels)
            options["kwargsrepr"] = tag_kwargsrepr(shown, identity, self.livingai.type)
        if headers:
            options["headers"] = headers
        return super().apply_async(args, kwargs, task_id, *rest, **options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        ctx = context.local.step
        if ctx is None or ctx.node.id != self.request.id:
            return super().__call__(*args, **kwargs)  # not recorded: run as plain Celery
        if ctx.decision is Decision.REPLAY:
            outcomes.record_replayed(self, ctx)
            return ctx.node.output
        if ctx.decision in (Decision.STALE, Decision.WAIT):
            # STALE: the current copy of this step runs (or ran) elsewhere. WAIT: recorded
            # WAITING for an approval; acked, the slot is free, approve/deny publish it again.
            raise Ignore()
        if ctx.decision is Decision.DENIED:
            raise ApprovalDenied(ctx.reason)
        if ctx.decision is Decision.IN_DOUBT:
            raise StepInDoubtError(ctx.reason)
        if ctx.decision is Decision.NO_INTENT:
            raise NotDurableError(ctx.reason)
        if ctx.decision is Decision.REFUSED:
            raise StepRefusedError(ctx.reason)
        if ctx.decision is Decision.STORE_DOWN:
            log.warning("livingai_tasks: %s", ctx.reason)
            raise Reject(ctx.reason, requeue=True)
        if ctx.decision is Decision.RECONCILE and self.livingai.reconcile is not None:
            outcome = self.livingai.reconcile(context.idempotency_key(), *args, **kwargs)
            if not isinstance(outcome, Reconciled):
                raise ConfigError(
                    f"reconcile callback of {self.name} must return Reconciled(done=..., "
                    f"output=...), got {type(outcome).__name__}."
                )
            if outcome.done:
                return self._recorded(ctx, outcome.output, 0.0, reconciled=True)
        started = time.perf_counter()
        try:
            output = super().__call__(*args, **kwargs)
        except Suspended:
            raise Ignore() from None  # WAITING is on record (waits.py): end, holding nothing
        # Recorded here, not in task_success: the tracer publishes the rest of the chain
        # before task_success fires, and a non-idempotent tool's SUCCESS must be durable
        # before anything after it can run.
        return self._recorded(ctx, output, (time.perf_counter() - started) * 1000)

    def _recorded(self, ctx: Any, output: Any, latency_ms: float, *,
                  reconciled: bool = False) -> Any:
        if not outcomes.record_success(self, ctx, output, latency_ms, reconciled=reconciled):
            # A tool's effect the store does not have yet: the chain must not go on from it.
            # Ignore stops it here; the record stays queued, and once it lands recovery
            # publishes the next step (or, if this process dies first, holds the tool).
            raise Ignore()
        return output


_STEPS: dict[str, StepSpec] = {}


def spec_of(task: Any) -> StepSpec | None:
    """The step spec of a task (object or name), or None for a task that is not a step."""
    name = task if isinstance(task, str) else getattr(task, "name", None)
    return _STEPS.get(name) if name else None


def _make_step(app: Any, spec: StepSpec, options: dict[str, Any], what: str) -> Callable[[F], Any]:
    if app is not None and not isinstance(app, Celery):
        raise ConfigError(
            f"@{what}(app) takes a Celery app as its first argument, got {type(app).__name__}. "
            f"Write @{what}(app) or @{what}() (shared task)."
        )
    base = options.pop("base", StepTask)
    if not (isinstance(base, type) and issubclass(base, StepTask)):
        raise ConfigError(f"@{what}(base=...) must be a subclass of livingai_tasks.StepTask, "
                          f"got {base!r}.")
    for key in ("serializer",):
        if key in options and options[key] != "json":
            raise ConfigError(f"@{what}({key}={options[key]!r}): steps accept only 'json' "
                              "(a message from the broker must never be able to run code).")

    def decorate(fn: F) -> Any:
        if not callable(fn) or inspect.isclass(fn):
            raise ConfigError(f"@{what} decorates a function, got {fn!r}.")
        cls = type(f"{base.__name__}_{fn.__name__}", (base,), {"livingai": spec})
        register = app.task if app is not None else shared_task
        task = register(base=cls, **options)(fn)
        _STEPS[task.name] = spec
        return task

    return decorate


def _node_type(value: Any, what: str) -> NodeType:
    try:
        return NodeType(value)
    except ValueError:
        raise ConfigError(f"@{what}(type={value!r}): accepted types are "
                          f"{[t.value for t in NodeType]}.") from None


def _delay(value: Any) -> float | None:
    try:
        return seconds(value, "start_after") or None
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def agent_step(app: Celery | None = None, *, type: NodeType | str = NodeType.PROMPT,
               idempotent: bool = True, start_after: Any = None,
               **task_options: Any) -> Callable[[F], Any]:
    """Make a function a Celery task recorded as a node (PROMPT unless `type=` says
    otherwise). Accepts every Celery task option (name, queue, bind, max_retries, ...).
    `start_after` (timedelta or seconds): a durable delay before the body first runs, held
    WAITING without a worker and woken by the recovery tick (not a broker countdown)."""
    if not isinstance(idempotent, bool):
        raise ConfigError(f"idempotent must be True or False, got {idempotent!r}.")
    node_type = _node_type(type, "agent_step")
    spec = StepSpec(node_type, idempotent, start_after_s=_delay(start_after))
    return _make_step(app, spec, task_options, "agent_step")


def tool_step(app: Celery | None = None, *, idempotent: bool = False,
              reconcile: Callable[..., Reconciled] | None = None,
              approval: bool | Callable[..., bool] = False,
              approvers: list[str] | tuple[str, ...] = (),
              approval_timeout: Any = None, start_after: Any = None,
              **task_options: Any) -> Callable[[F], Any]:
    """A TOOL node; non-idempotent by default. An attempt whose outcome is unknown (its worker
    died, or was paused, during it) is held IN_DOUBT, unless `idempotent=True` or
    `reconcile(idempotency_key, *args, **kwargs) -> Reconciled` can tell what happened.

    Its start is recorded durably, under the execution's fence, before the body runs: a worker
    that lost the step before that never calls the tool. A worker paused inside the call can
    still finish it after another attempt made it too (nothing outside the provider can stop
    a call already under way): pass `lai.idempotency_key()`, the same for every attempt, to
    providers that honour one, and give `reconcile=` so a new attempt asks first.

    `approval=True` gates every call on a person's decision, `approval=callable(*args,
    **kwargs) -> bool` the calls it says (e.g. charges over 100): before the body runs the
    step is WAITING, holding no worker, until `lai.approve`/`lai.deny` (or the CLI) decide.
    `approvers` limits who may decide; `approval_timeout` (timedelta or seconds) denies a
    call nobody decided in time. `start_after` as for agent_step. See celery_wing/waits.py."""
    if not isinstance(idempotent, bool):
        raise ConfigError(f"idempotent must be True or False, got {idempotent!r}.")
    if reconcile is not None and not callable(reconcile):
        raise ConfigError(f"reconcile must be a callable, got {reconcile!r}.")
    if not (approval is True or approval is False or callable(approval)):
        raise ConfigError(f"approval must be True, False or a callable(*args, **kwargs) -> "
                          f"bool, got {approval!r}.")
    if isinstance(approvers, str) or not all(isinstance(a, str) for a in approvers):
        raise ConfigError(f"approvers must be a list of names, got {approvers!r}.")
    try:
        timeout_s = seconds(approval_timeout, "approval_timeout")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    spec = StepSpec(NodeType.TOOL, idempotent, reconcile,
                    approval=None if approval is False else approval,
                    approvers=tuple(approvers), approval_timeout_s=timeout_s,
                    start_after_s=_delay(start_after))
    return _make_step(app, spec, task_options, "tool_step")
