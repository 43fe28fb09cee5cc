"""OpenAI Agents SDK agents run durably inside a step.

    from livingai_tasks.adapters.openai_agents import run_durably

    @lai.agent_step(app)
    def support(ticket: dict) -> str:
        return run_durably(agent, ticket["text"]).final_output

Every model response and every function-tool invocation of the run is a journaled call of
the step (livingai_tasks.call): a re-run of the step after a crash returns the recorded
responses and tool results without asking the model or running the tool again; a tool is
non-idempotent unless marked with `idempotent(tool)`, and one whose worker died while it
ran holds the step IN_DOUBT instead of running twice. Tools with `needs_approval` make the
step wait for the event `approval_event(call_id)` (README, "OpenAI Agents SDK").
"""

from __future__ import annotations

try:
    import agents  # noqa: F401  - the extra's presence, checked before the rooms import it
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "livingai_tasks.adapters.openai_agents needs the OpenAI Agents SDK: "
        "pip install 'livingai-tasks[openai-agents]'") from exc

from .journal import response_from_json, response_to_json  # noqa: E402
from .runner import (  # noqa: E402
    approval_event,
    approve_tool_call,
    reject_tool_call,
    run_durably,
)
from .wrap import (  # noqa: E402
    JournaledModel,
    JournaledModelProvider,
    durable_agent,
    durable_run_config,
    idempotent,
)

__all__ = ["run_durably", "idempotent", "approval_event", "approve_tool_call",
           "reject_tool_call", "durable_agent", "durable_run_config", "JournaledModel",
           "JournaledModelProvider", "response_to_json", "response_from_json"]
