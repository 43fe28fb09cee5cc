"""CrewAI crews run durably inside a step, and CrewAI Flows persisted in our stores.

    from livingai_tasks.adapters.crewai import idempotent, kickoff_durably

    @lai.agent_step(app)
    def support(ticket: dict) -> str:
        return kickoff_durably(build_crew(), inputs=ticket).raw

Every model call of the crew's agents (a JournaledLLM around each agent's LLM) and every
tool run (a JournaledTool around each tool) is a journaled call of the step
(livingai_tasks.call): a re-run after a crash returns the recorded answers and tool
results without asking the model or running the tool again; a tool is non-idempotent
unless wrapped with `idempotent(tool)`, and one whose worker died while it ran holds the
step IN_DOUBT instead of running twice. A tool wrapped with `needs_approval(tool)` makes the
step wait durably for `approval_event(tool name)`. `LivingAIFlowPersistence` keeps the state of
`@persist` Flows in a livingai_tasks store (README, "CrewAI crews, durably").
Needs `pip install 'livingai-tasks[crewai]'`.
"""

from __future__ import annotations

from . import _framework  # noqa: F401  (the missing-extra error, before the rooms import it)
from .crew import durable_agent, durable_crew, kickoff_durably
from .llm import JournaledLLM, journaled_llm
from .persistence import SPACE, LivingAIFlowPersistence
from .scope import journaling
from .wrap import (
    JournaledTool,
    ToolError,
    approval_event,
    approve_tool_call,
    idempotent,
    journaled_tool,
    needs_approval,
    reject_tool_call,
)

__all__ = ["kickoff_durably", "durable_crew", "durable_agent", "journaling", "idempotent",
           "needs_approval", "approval_event", "approve_tool_call", "reject_tool_call",
           "journaled_tool", "journaled_llm", "JournaledLLM", "JournaledTool", "ToolError",
           "LivingAIFlowPersistence", "SPACE"]
