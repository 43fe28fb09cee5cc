"""Steps run eagerly in the test process, on a SQLite file store of the test's own: what the
eager test files share (the app, its tasks and its cleanup are each file's own)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import livingai_tasks as lai
from livingai_tasks.celery_wing import runtime as lai_runtime


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
