"""What the modules `celery -A` loads share: their `app`, built from the environment on
first use, and each process's own Redis client for the counters the steps keep.

A worker's module must not build its Celery app on import: the driver imports the same
module for its names and helpers, with none of the workers' environment set. So the module
answers `app` through a module-level __getattr__ (PEP 562), built once, when asked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import redis

__all__ = ["lazy_app", "process_redis"]

_client: tuple[int, redis.Redis] | None = None


def process_redis() -> redis.Redis:
    """This process's client of LT_REDIS (where the steps count what really happened):
    never shared across a fork, so a pool child makes its own."""
    global _client
    if _client is None or _client[0] != os.getpid():
        _client = (os.getpid(), redis.Redis.from_url(os.environ.get(
            "LT_REDIS", "redis://127.0.0.1:6379/0")))
    return _client[1]


def lazy_app(module: str, build: Callable[[], Any]) -> Callable[[str], Any]:
    """A module __getattr__ for `module` (its __name__): `app` is `build()`, called once;
    any other missing name is an AttributeError, as for an ordinary module."""
    built: list[Any] = []

    def __getattr__(name: str) -> Any:
        if name != "app":
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        if not built:
            built.append(build())
        return built[0]

    return __getattr__
