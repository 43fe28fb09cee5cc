"""Journaled calls inside a running step: `lai.call(fn, ...)` and `@lai.journaled(...)`.

Each call made inside a step is recorded as a child node of the step (journal.py says how
it is keyed and decided). The step's own record and lease are the lifecycle's
(lifecycle.py); a call follows the same rules as a tool step:

- a non-idempotent call's start is durable, a compare-and-set on the step's fence, before
  it runs: a worker that lost its execution never makes the call (FencedOutError);
- its result is recorded before the step goes on;
- after a crash, recorded calls return their recorded result, the first call with no
  record runs live, and a non-idempotent call started but not finished is reconciled
  (`reconcile=`) or holds the step IN_DOUBT until `resolve`.

Outside a step (a plain function call, a test, a thread the step started) `call()` just
calls the function: nothing is recorded.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, overload

from ..errors import (
    CallOrderError,
    ConfigError,
    NotDurableError,
    NotJSONSerializableError,
    StepInDoubtError,
)
from ..journal import (
    CallDecision,
    CallSpec,
    call_node_id,
    decide_call,
    model_in_result,
    running_call,
    usage_in_result,
    usage_of,
)
from ..nodes import (
    ErrorInfo,
    ExecutionNode,
    ExecutionStatus,
    Meta,
    Status,
    dumps_json,
    loads_json,
    utcnow,
)
from . import context, runtime
from .context import CALL_ID, Decision, StepContext
from .lifecycle import Reconciled

__all__ = ["call", "acall", "journaled"]

log = logging.getLogger("livingai_tasks.journal")
F = TypeVar("F", bound=Callable[..., Any])
_CURSOR = "journal"  # the step context's extra key of its _Cursor


class _Cursor:
    """Where a running step is in its journal: the next call's order, whether earlier
    attempts may have recorded calls, and why the step was held (if it was)."""

    def __init__(self, replaying: bool) -> None:
        self.next = 0
        self.replaying = replaying
        self.held = ""

    def take(self) -> int:
        index, self.next = self.next, self.next + 1
        return index


def _running_step() -> StepContext | None:
    ctx = context.local.step
    if ctx is None or ctx.decision not in (Decision.RUN, Decision.RECONCILE) \
            or not ctx.node.execution_id:
        return None
    return ctx


def call(fn: Callable[..., Any], /, *args: Any, name: str | None = None,
         idempotent: bool | None = None, kind: str = "tool", model: str | None = None,
         usage: Callable[[Any], Any] | None = None,
         reconcile: Callable[..., Reconciled] | None = None, **kwargs: Any) -> Any:
    """Call `fn(*args, **kwargs)` as a journaled call of the running step, and return its
    result (as recorded: the JSON round trip of what `fn` returned, so a live call and a
    replayed one return the same thing).

    `name` (default: fn's module and qualified name) is checked on replay: a step whose
    calls come in another order than recorded fails with CallOrderError naming both.
    `kind` is "tool" (default), "model" or "memory". `idempotent` defaults to True for a
    model call, False otherwise: a non-idempotent call's start is made durable before it
    runs, and a crash during it holds the step IN_DOUBT (unless `reconcile(key, *args,
    **kwargs) -> Reconciled` can tell what happened). `model` names the model; `usage`
    reads the token usage from the result (a model call without it looks for
    result["usage"]). The keywords name, idempotent, kind, model, usage and reconcile are
    this function's: wrap `fn` (functools.partial) to pass arguments so named to it.

    Outside a running step, or inside another journaled call (whose result is what is
    recorded), it calls `fn` and returns its result, recording nothing.
    Raises what `fn` raises (recorded as the call's FAILED version), NotJSONSerializableError
    for a result that cannot be recorded, CallOrderError, StepInDoubtError (the step is held),
    FencedOutError (this attempt lost its execution), NotDurableError (a non-idempotent
    call's start could not be recorded: it did not run)."""
    spec = CallSpec.of(fn, name=name, kind=kind, idempotent=idempotent, model=model,
                       usage=usage, reconcile=reconcile)
    begun = _begin(spec, args, kwargs)
    if begun is None:
        return fn(*args, **kwargs)
    if isinstance(begun, _Done):
        return begun.value
    ctx, node = begun
    started = _start(node, spec)
    try:
        result = _with_call_id(ctx, node.id, lambda: fn(*args, **kwargs))
    except Exception as exc:
        # A raise is an outcome: the call returned, with an error (a process that dies
        # mid-call raises nothing, and leaves its start on record).
        _failed(node, exc, started)
        raise
    return _succeeded(node, spec, result, (time.perf_counter() - started) * 1000)


async def acall(fn: Callable[..., Awaitable[Any]], /, *args: Any, name: str | None = None,
                idempotent: bool | None = None, kind: str = "tool", model: str | None = None,
                usage: Callable[[Any], Any] | None = None,
                reconcile: Callable[..., Reconciled] | None = None, **kwargs: Any) -> Any:
    """`call()` for a coroutine function: `await fn(*args, **kwargs)` journaled the same way,
    for framework adapters whose agent loop is async (it runs on the step's own thread, in
    the event loop the step body drives, so the step's context is the same). One journaled
    call at a time per step: concurrent ones would take their order from the scheduler."""
    spec = CallSpec.of(fn, name=name, kind=kind, idempotent=idempotent, model=model,
                       usage=usage, reconcile=reconcile, awaitable=True)
    begun = _begin(spec, args, kwargs)
    if begun is None:
        return await fn(*args, **kwargs)
    if isinstance(begun, _Done):
        return begun.value
    ctx, node = begun
    started = _start(node, spec)
    outer = ctx.extra.get(CALL_ID)
    ctx.extra[CALL_ID] = node.id
    try:
        result = await fn(*args, **kwargs)
    except Exception as exc:
        _failed(node, exc, started)
        raise
    finally:
        ctx.extra[CALL_ID] = outer
        if outer is None:
            del ctx.extra[CALL_ID]
    return _succeeded(node, spec, result, (time.perf_counter() - started) * 1000)


class _Done:
    """A call that does not run: its recorded (or reconciled) result."""

    def __init__(self, value: Any) -> None:
        self.value = value


def _begin(spec: CallSpec, args: tuple[Any, ...], kwargs: dict[str, Any]
           ) -> tuple[StepContext, ExecutionNode] | _Done | None:
    """Take the call's place in the step's journal and decide it: None outside a step (call
    it plainly), _Done for a replayed or reconciled call, else the step and the RUNNING
    version of a call to run live."""
    ctx = _running_step()
    if ctx is None or ctx.extra.get(CALL_ID):
        # Outside a step; or inside a journaled call, whose own result is what is recorded:
        # a replay of it makes none of the calls nested in it, so they take no place.
        return None
    cursor = ctx.extra.get(_CURSOR)
    if not isinstance(cursor, _Cursor):
        cursor = ctx.extra[_CURSOR] = _Cursor(_ran_before(ctx.node))
    if cursor.held:
        raise StepInDoubtError(cursor.held)  # the step is held: no call after it may run
    index = cursor.take()
    recorded = _recorded(call_node_id(ctx.node.id, index)) \
        if cursor.replaying or index == 0 else None
    cursor.replaying = cursor.replaying or recorded is not None
    decision, why = decide_call(recorded, name=spec.name, index=index,
                                reconcilable=spec.reconcile is not None)
    if decision is CallDecision.REPLAY and recorded is not None:
        runtime.get().engine.metrics.incr("calls_replayed")
        return _Done(loads_json(dumps_json(recorded.output, what=f"Call {recorded.id}")))
    if decision is CallDecision.MISMATCH:
        raise CallOrderError(why)
    if decision is CallDecision.IN_DOUBT and recorded is not None:
        _hold(ctx, cursor, recorded, why)
    node = running_call(ctx.node, index, spec, fence=ctx.fence, owner=runtime.get().owner,
                        worker=runtime.get().worker, input=_input(args, kwargs),
                        previous=recorded)
    if decision is CallDecision.RECONCILE and spec.reconcile is not None:
        check = spec.reconcile
        outcome = _with_call_id(ctx, node.id,
                                lambda: check(context.idempotency_key(), *args, **kwargs))
        if not isinstance(outcome, Reconciled):
            raise ConfigError(f"reconcile callback of call {spec.name!r} must return "
                              f"Reconciled(done=..., output=...), got {type(outcome).__name__}.")
        if outcome.done:
            return _Done(_succeeded(node, spec, outcome.output, 0.0, reconciled=True))
    return ctx, node


def _ran_before(step: ExecutionNode) -> bool:
    """May an earlier run of this step have recorded calls? A re-run after a crash or a
    retry is a later attempt; a step woken from a wait (waits.py) runs again under the same
    attempt, with the wait on its record. Otherwise the first call's record decides (one
    read): a run with none of its own has none to replay."""
    return int(step.metadata.get(Meta.ATTEMPT, 1)) > 1 or Meta.WAIT in step.metadata \
        or Meta.WOKEN_BY in step.metadata


def _recorded(call_id: str) -> ExecutionNode | None:
    """The record of a call in an earlier attempt: the store's (an operator's resolution or
    another process's attempt is there, and this process's hot cache may hold an older
    version), else this process's own, still queued for the store."""
    engine = runtime.get().engine
    found: ExecutionNode | None = engine.store.get_node(call_id)
    return found if found is not None else engine.get_node(call_id)


def _start(node: ExecutionNode, spec: CallSpec) -> float:
    """Before a live call: a non-idempotent call's start made durable; its start time."""
    engine = runtime.get().engine
    if not spec.idempotent:
        # Durable evidence before the call, as a tool step's start: a crash during it is
        # then never mistaken for "never started". Behind this process's earlier writes
        # (not the priority lane), so the journal in the store is always a prefix: nothing
        # after a call is on record unless everything before it is.
        try:
            engine.save(node, durable=True)
        except NotDurableError as exc:
            raise NotDurableError(f"call {spec.name!r} ({node.id}) did not run: its start "
                                  f"could not be made durable ({exc}); it is safe to retry"
                                  ) from exc
    engine.metrics.incr("calls_live")
    return time.perf_counter()


def _with_call_id(ctx: StepContext, call_id: str, thunk: Callable[[], Any]) -> Any:
    """Run `thunk` with lai.idempotency_key() answering the call's own key (the same for
    every attempt of this call, and different from the step's other calls)."""
    outer = ctx.extra.get(CALL_ID)
    ctx.extra[CALL_ID] = call_id
    try:
        return thunk()
    finally:
        ctx.extra[CALL_ID] = outer
        if outer is None:
            del ctx.extra[CALL_ID]


def _succeeded(node: ExecutionNode, spec: CallSpec, result: Any, latency_ms: float, *,
               reconciled: bool = False) -> Any:
    what = f"Result of call {spec.name!r} ({node.id})"
    try:
        encoded = dumps_json(result, what=what)
        tokens = _usage(spec, result, what)
    except (NotJSONSerializableError, ConfigError) as exc:
        _failed(node, exc, None)
        raise
    metadata = dict(node.metadata)
    if reconciled:
        metadata[Meta.RECONCILED] = True
    if tokens is not None:
        metadata[Meta.USAGE] = tokens
    found_model = model_in_result(result) if spec.kind == "model" else None
    if Meta.MODEL not in metadata and found_model:
        metadata[Meta.MODEL] = found_model
    done = node.evolve(status=Status.SUCCESS, output=loads_json(encoded), completed_at=utcnow(),
                       latency_ms=int(round(latency_ms)), metadata=metadata,
                       cost_tokens=tokens["total_tokens"] if tokens else None)
    engine = runtime.get().engine
    try:
        # A non-idempotent call's result is made durable before the step goes on, as a
        # tool step's: the narrowest window in which a crash leaves it of unknown outcome.
        engine.save(done, durable=not spec.idempotent, wait=not spec.idempotent)
    except NotDurableError as exc:
        # It stays queued and lands in order; if this process dies first the re-run finds
        # the call started and unfinished, and holds it. The step goes on meanwhile.
        log.warning("livingai_tasks: the result of call %s (%s) is not durable yet (%s); it "
                    "stays queued", spec.name, node.id, exc)
    return loads_json(encoded)


def _usage(spec: CallSpec, result: Any, what: str) -> dict[str, int] | None:
    if spec.usage is not None:
        return usage_of(spec.usage(result), what=f"{what}: its usage= hook")
    if spec.kind == "model":
        found = usage_in_result(result)
        return usage_of(found, what=f"{what}: its usage") if found is not None else None
    return None


def _failed(node: ExecutionNode, exc: BaseException, started: float | None) -> None:
    """The call raised (or its result cannot be recorded): its FAILED version, queued."""
    latency = None if started is None else int(round((time.perf_counter() - started) * 1000))
    try:
        runtime.get().engine.save(node.evolve(status=Status.FAILED, completed_at=utcnow(),
                                              error=ErrorInfo.from_exception(exc),
                                              latency_ms=latency), wait=False)
    except Exception:  # noqa: BLE001 - the call's own error is the one to raise
        log.exception("livingai_tasks: recording the failure of call %s failed", node.id)


def _hold(ctx: StepContext, cursor: _Cursor, recorded: ExecutionNode, why: str) -> None:
    """Hold the step IN_DOUBT because of a call of unknown outcome (as begin_step holds a
    tool step): the call, the step and the execution, durably and under the step's fence.
    Raises StepInDoubtError (or FencedOutError if this attempt lost its execution)."""
    rt = runtime.get()
    engine = rt.engine
    step = ctx.node
    if ctx.extra.pop("heartbeat", False):
        # A held step has no lease to renew (resolve claims the execution once it is free).
        rt.heartbeat.remove(step.execution_id)
    reason = (f"step {step.metadata.get(Meta.TASK)} ({step.id}) is held: {why}. Resolve the "
              f"call: `livingai-tasks resolve {step.execution_id} {recorded.id} "
              "--app <module:app> --done '<its result as JSON>'` if it happened, or `--retry` "
              "if not")
    held_call = recorded.evolve(status=Status.IN_DOUBT, checkpoint=None, metadata={
        **recorded.metadata, Meta.FENCE: ctx.fence, Meta.IN_DOUBT_REASON: why})
    held_step = step.evolve(status=Status.IN_DOUBT, checkpoint=None, metadata={
        **step.metadata, Meta.IN_DOUBT_REASON: reason})
    engine.save(held_call, durable=True)
    engine.save(held_step, durable=True)
    engine.update_execution(step.execution_id, durable=True, status=ExecutionStatus.IN_DOUBT,
                            reason=reason, current_node_id=step.id, lease_deadline=None,
                            if_fence=ctx.fence)
    engine.metrics.incr("executions_in_doubt")
    ctx.node = held_step
    cursor.held = reason
    log.warning("livingai_tasks: %s", reason)
    raise StepInDoubtError(reason)


def _input(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The call's arguments for the record, when JSON can carry them; else only their
    types (an SDK object, a client): the record is for reading, replay never needs it."""
    try:
        encoded = dumps_json({"args": list(args), "kwargs": kwargs}, what="call input")
    except NotJSONSerializableError:
        return {"not_recorded": [type(a).__name__ for a in args]
                + [f"{k}={type(v).__name__}" for k, v in kwargs.items()]}
    # A copy: an agent appends to the message list it passed once the call returns, and
    # the record (in this process's hot cache too) must keep what the call was given.
    return loads_json(encoded)


@overload
def journaled(fn: F, /) -> F: ...


@overload
def journaled(*, name: str | None = None, idempotent: bool | None = None, kind: str = "tool",
              model: str | None = None, usage: Callable[[Any], Any] | None = None,
              reconcile: Callable[..., Reconciled] | None = None) -> Callable[[F], F]: ...


def journaled(fn: Any = None, /, *, name: str | None = None, idempotent: bool | None = None,
              kind: str = "tool", model: str | None = None,
              usage: Callable[[Any], Any] | None = None,
              reconcile: Callable[..., Reconciled] | None = None) -> Any:
    """Decorator: every call of the function goes through `call()` with these options
    (`@lai.journaled` alone: a non-idempotent tool call named after the function)."""
    def decorate(target: F) -> F:
        CallSpec.of(target, name=name, kind=kind, idempotent=idempotent, model=model,
                    usage=usage, reconcile=reconcile)  # checked once, here

        @functools.wraps(target)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            return call(target, *args, name=name, idempotent=idempotent, kind=kind,
                        model=model, usage=usage, reconcile=reconcile, **kwargs)

        return wrapper  # type: ignore[return-value]

    return decorate if fn is None else decorate(fn)
