"""LangGraph on livingai_tasks: a checkpointer over our stores (saver.py) and graph nodes run
as journaled calls inside a step (graph.py). Needs `pip install 'livingai-tasks[langgraph]'`."""

from .graph import INTERRUPT_EVENT, NODE_KEYS, durable_graph, run_graph
from .saver import SPACE, LivingAISaver, safe_serializer

__all__ = ["LivingAISaver", "SPACE", "safe_serializer", "durable_graph", "run_graph",
           "NODE_KEYS", "INTERRUPT_EVENT"]
