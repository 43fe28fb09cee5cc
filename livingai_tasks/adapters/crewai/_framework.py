"""The one place the CrewAI adapter checks that CrewAI is installed."""

from __future__ import annotations

try:
    import crewai  # noqa: F401
    import crewai.flow.persistence.base  # noqa: F401
    import crewai.llms.base_llm  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised without the extra installed
    raise ImportError(
        "livingai_tasks.adapters.crewai needs CrewAI (crewai >= 1.15): "
        "pip install 'livingai-tasks[crewai]'"
    ) from exc

__all__: list[str] = []
