"""LangGraph on livingai_tasks: a checkpointer over our stores and graph nodes run as
journaled calls inside a step. Needs `pip install 'livingai-tasks[langgraph]'`."""

from .saver import SPACE, LivingAISaver, safe_serializer

__all__ = ["LivingAISaver", "SPACE", "safe_serializer"]
