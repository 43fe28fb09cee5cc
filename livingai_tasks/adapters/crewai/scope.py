"""Journaled calls made from CrewAI's own threads.

CrewAI runs an agent's loop as a Flow whose synchronous methods run in worker threads
(asyncio.to_thread), so a model or tool call never happens on the step's thread, where the
journal finds its running step (a thread-local). `journaling()` opens a scope, carried into
those threads by the context variables CrewAI copies, and each journaled call borrows the
step for its duration, one call at a time: the journal is keyed by order, so calls that
CrewAI would make concurrently are serialized in arrival order (wrap.py keeps a turn's tool
calls sequential so that order is the same on a re-run).

CrewAI turns a tool's exception into text for the model and retries a failed task, so a
library error (a call held IN_DOUBT, a fenced-out attempt, a step suspended for an approval)
raised inside a call would be swallowed: the scope keeps the first one, every later
journaled call raises it at once, and `journaling()` raises it when CrewAI returns.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator
from typing import Any

from ...celery_wing import context as lai_context
from ...celery_wing.context import StepContext
from ...celery_wing.journal import call as journal_call
from ...celery_wing.waits import Suspended
from ...errors import LivingAIError

__all__ = ["RunScope", "journaling", "journaling_active", "journaled", "in_step"]

# What ends the step whatever CrewAI makes of it.
FATAL = (LivingAIError, Suspended)


class RunScope:
    """One journaling() block: the step it journals into, the lock serializing its calls,
    and the first library error raised in it."""

    def __init__(self, step: StepContext) -> None:
        self.step = step
        self.lock = threading.Lock()
        self.fatal: BaseException | None = None


_RUN: contextvars.ContextVar[RunScope | None] = contextvars.ContextVar("lai_crewai_run",
                                                                      default=None)
# Set while a journaled call's body runs: calls nested in it (a tool that kicks off another
# crew) are part of its recorded result, not calls of their own.
_IN_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("lai_crewai_in_call",
                                                                default=False)


@contextlib.contextmanager
def journaling() -> Iterator[RunScope | None]:
    """Journal the model and tool calls of the CrewAI runs made inside this block (through
    JournaledLLM and JournaledTool) in the running step. Outside a step it does nothing.
    On leaving, a library error raised inside (StepInDoubtError, CallOrderError,
    FencedOutError, a suspension for a wait) is raised as itself, even when CrewAI caught
    it or wrapped it."""
    step = lai_context.local.step
    if step is None:
        yield None
        return
    scope = RunScope(step)
    token = _RUN.set(scope)
    try:
        yield scope
    except BaseException as exc:
        if scope.fatal is not None and exc is not scope.fatal:
            raise scope.fatal from exc
        raise
    finally:
        _RUN.reset(token)
    if scope.fatal is not None:
        raise scope.fatal


def journaling_active() -> bool:
    """Inside a journaling() block of a running step (in any of CrewAI's threads)."""
    return _RUN.get() is not None


def journaled(fn: Callable[[Any], Any], request: Any, *, fatal_errors: bool = False,
              **options: Any) -> Any:
    """`fn(request)` as a journaled call of the scope's step (options as lai.call's), from
    whatever thread CrewAI runs it on. Outside a scope, or nested in another journaled call,
    it just runs. `fatal_errors`: any exception of the call ends the step (a model call: a
    retry by CrewAI would be a call of its own, and a re-run would hand the retry's record
    to the wrong request)."""
    if _RUN.get() is None or _IN_CALL.get():
        return fn(request)
    return in_step(lambda: journal_call(fn, request, **options), fatal_errors=fatal_errors)


def in_step(thunk: Callable[[], Any], *, fatal_errors: bool = False) -> Any:
    """`thunk()` with the scope's step as the current step of this thread (the journal and
    the waits read it from a thread-local), one at a time. A library error raised by it is
    kept as the scope's fatal error (and so is any error, with `fatal_errors`)."""
    scope = _RUN.get()
    if scope is None:
        return thunk()
    if scope.fatal is not None:
        raise scope.fatal
    with scope.lock:
        previous = lai_context.local.step
        lai_context.local.step = scope.step
        token = _IN_CALL.set(True)
        try:
            return thunk()
        except FATAL as exc:
            scope.fatal = scope.fatal or exc
            raise
        except Exception as exc:
            if fatal_errors:
                scope.fatal = scope.fatal or exc
            raise
        finally:
            _IN_CALL.reset(token)
            lai_context.local.step = previous
