"""Steps run eagerly in the test process, on a SQLite file store of the test's own: what the
eager test files share (the app, its tasks and its cleanup are each file's own), and the
crash-and-deliver-again moves of the journal and adapter tests."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import livingai_tasks as lai
from livingai_tasks.celery_wing import runtime as lai_runtime
from livingai_tasks.journal import is_call


@contextlib.contextmanager
def eager_store(app: Any, tmp_path: Any, name: str) -> Iterator[None]:
    """`app` installed on sqlite:///<tmp_path>/<name>.db (migrated), closed afterwards."""
    lai.install(app, store=f"sqlite:///{tmp_path}/{name}.db", lease_s=30)
    lai_runtime.get().engine.store.migrate()
    try:
        yield
    finally:
        lai_runtime.get().close()


def store() -> Any:
    return lai_runtime.get().engine.store


def flush() -> None:
    assert lai_runtime.get().flush(10)


def deliver_again(task: Any, step: Any, *args: Any) -> Any:
    """`step`'s message delivered again (as recovery publishes it), under its execution's
    fence, with `args`."""
    fence = store().get_execution(step.execution_id).fence
    return task.apply(args, task_id=step.id, headers={
        "lai_execution_id": step.execution_id, "lai_seq": step.seq, "lai_fence": fence})


def crashed_step(start: Callable[[], Any], crash: type[BaseException]) -> Any:
    """The step of the only execution once `start()` raised `crash` (a process dying in a
    step, for an eager test), its records flushed."""
    with pytest.raises(crash):
        start()
    flush()
    [execution] = store().list_executions()
    [step] = [n for n in store().nodes(execution.id) if not is_call(n)]
    return step


def journaled_calls(execution_id: str) -> list[Any]:
    """The execution's journaled-call nodes."""
    return [n for n in store().nodes(execution_id) if is_call(n)]
