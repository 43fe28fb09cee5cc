"""The `app` of a module that `celery -A` loads, built from the environment on first use.

A worker's module must not build its Celery app on import: the driver imports the same
module for its names and helpers, with none of the workers' environment set. So the module
answers `app` through a module-level __getattr__ (PEP 562), built once, when asked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["lazy_app"]


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
