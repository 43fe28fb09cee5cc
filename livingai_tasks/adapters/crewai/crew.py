"""kickoff_durably: a CrewAI crew run inside a step with its model and tool calls journaled."""

from __future__ import annotations

from typing import Any

from crewai import Agent, Crew, Task
from crewai.crews.crew_output import CrewOutput

from ...errors import ConfigError
from . import _framework  # noqa: F401  (the missing-extra error)
from .llm import journaled_llm
from .scope import journaling
from .wrap import journaled_tool

__all__ = ["durable_crew", "durable_agent", "kickoff_durably"]


def durable_agent(agent: Any) -> Any:
    """Make a CrewAI Agent journal its calls, in place, and return it: its LLM (and
    function-calling LLM) becomes a JournaledLLM and its tools JournaledTools. For an agent
    run on its own: `with journaling(): durable_agent(agent).kickoff(...)` in a step. An
    agent of another framework (CrewAI's adapters) is returned unchanged: its calls are not
    journaled."""
    if not isinstance(agent, Agent):
        return agent
    # Read from the fields (allow_code_execution is deprecated: reading it warns).
    runtime_tools = [what for what in ("mcps", "apps", "allow_code_execution")
                     if agent.__dict__.get(what)]
    if runtime_tools:
        raise ConfigError(
            f"Agent {agent.role!r} sets {', '.join(runtime_tools)}: CrewAI adds those tools "
            "when a task starts, past the journal, so a re-run would run them again. Give "
            "the agent their work as tools of its own (agent.tools), which are journaled.")
    agent.llm = journaled_llm(agent.llm)
    _wrap_field(agent, "function_calling_llm")
    agent.tools = [journaled_tool(t) for t in agent.tools or []]
    return agent


def _durable_task(task: Task) -> None:
    if task.async_execution:
        raise ConfigError(
            f"Task {task.name or task.description[:60]!r} has async_execution=True: it would "
            "run beside other tasks, and the journal is keyed by the order of calls. Run its "
            "tasks sequentially, or give each parallel branch a step of its own.")
    if task.tools:
        task.tools = [journaled_tool(t) for t in task.tools]
    if task.agent is not None:
        durable_agent(task.agent)


def durable_crew(crew: Crew) -> Crew:
    """Make `crew` journal its calls, in place, and return it: every agent's LLM (and
    function-calling LLM) becomes a JournaledLLM and every tool of its agents and tasks a
    JournaledTool (non-idempotent unless already wrapped with `idempotent(tool)`), as do
    the crew's manager, planning and function-calling LLMs. Doing it again changes nothing.
    ConfigError for what the journal cannot keep in order (a task with async_execution)."""
    if not isinstance(crew, Crew):
        raise ConfigError(f"durable_crew() takes a crewai.Crew, got {crew!r}.")
    for agent in crew.agents:
        durable_agent(agent)
    if crew.manager_agent is not None:
        durable_agent(crew.manager_agent)
    for task in crew.tasks:
        _durable_task(task)
    for field in ("manager_llm", "planning_llm", "function_calling_llm"):
        _wrap_field(crew, field)
    return crew


def _wrap_field(model: Any, field: str) -> None:
    """Journal an LLM field if it is set. Read from the model's fields, not as an attribute:
    CrewAI deprecates some of them (function_calling_llm), and reading one warns."""
    value = model.__dict__.get(field)
    if value is not None:
        setattr(model, field, journaled_llm(value))


def kickoff_durably(crew: Crew, inputs: dict[str, Any] | None = None, **kwargs: Any
                    ) -> CrewOutput:
    """`crew.kickoff(inputs)` inside an @lai.agent_step body with its model and tool calls
    journaled in the step (durable_crew() is applied first): a re-run after a crash replays
    the recorded answers and tool results, and a non-idempotent tool whose worker died
    while it ran holds the step IN_DOUBT instead of running twice. Outside a step it is a
    plain kickoff.

    Build the crew inside the step (a function that returns a new Crew): CrewAI keeps state
    per instance (tool result caches, usage counters, token totals) that a crew shared by
    the runs of one worker process would carry from one run into the next.

    Raises what the kickoff raises; a journal error (StepInDoubtError, CallOrderError,
    FencedOutError, NotDurableError) or a failed model call is raised as itself, even when
    CrewAI caught it."""
    durable_crew(crew)
    if crew.stream:
        raise ConfigError("kickoff_durably() journals whole model answers: run the crew with "
                          "stream=False (a replayed answer has no chunks to stream).")
    with journaling():
        out = crew.kickoff(inputs=inputs, **kwargs)
    if not isinstance(out, CrewOutput):
        raise ConfigError(f"Crew.kickoff() returned a {type(out).__name__}, not a CrewOutput.")
    return out
