"""The one place the LangGraph adapter checks that LangGraph is installed."""

from __future__ import annotations

try:
    import langgraph.checkpoint.base  # noqa: F401
    import langgraph.graph  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "livingai_tasks.adapters.langgraph needs LangGraph: "
        "pip install 'livingai-tasks[langgraph]'"
    ) from exc

__all__: list[str] = []
