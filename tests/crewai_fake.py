"""A scripted CrewAI model and a support crew for the CrewAI adapter's tests: offline, no
API key. The model answers by the turn (the assistant messages already in the
conversation), counts each of its calls through `count` and reports token usage as a
provider would; the tools count their real effects the same way."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")
os.environ.setdefault("OTEL_SDK_DISABLED", "true")

from crewai import Agent, Crew, Task  # noqa: E402
from crewai.llms.base_llm import BaseLLM  # noqa: E402
from crewai.tools import tool  # noqa: E402

from livingai_tasks.adapters.crewai import idempotent, needs_approval  # noqa: E402

Counter = Callable[[str], int]
Pause = Callable[[str], None]


def turn_of(messages: Any) -> int:
    if isinstance(messages, str):
        return 0
    return sum(1 for m in messages if m.get("role") == "assistant")


def usage_of_turn(turn: int) -> dict[str, int]:
    return {"prompt_tokens": 100 + turn, "completion_tokens": 10 + turn,
            "total_tokens": 110 + 2 * turn}


def observations(messages: Any) -> list[str]:
    """The tool results the conversation holds (the line after "Observation:" in the
    assistant's messages, where CrewAI's ReAct loop appends them)."""
    found = []
    for m in messages if not isinstance(messages, str) else []:
        text = m.get("content") or ""
        if m.get("role") == "assistant" and "\nObservation:" in text:
            found.append(text.split("\nObservation:", 1)[1].strip().split("\n", 1)[0])
    return found


class ScriptedLLM(BaseLLM):
    """Answers `script[turn]` (ReAct text); the last answer lists what it observed."""

    script: list[str]
    label: str
    counter: Any = None
    pauser: Any = None

    def call(self, messages: Any, tools: Any = None, callbacks: Any = None,
             available_functions: Any = None, from_task: Any = None, from_agent: Any = None,
             response_model: Any = None) -> Any:
        turn = turn_of(messages)
        self.counter(f"{self.label}:model:{turn}")
        self.pauser(f"{self.label}:model:{turn}")
        self._track_token_usage_internal(usage_of_turn(turn))
        answer = self.script[min(turn, len(self.script) - 1)]
        if "Final Answer:" in answer:
            answer += json.dumps(observations(messages))
        return answer

    def supports_function_calling(self) -> bool:
        return False

    def get_context_window_size(self) -> int:
        return 100_000

    def get_input_tokens_count(self, messages: Any, tools: Any = None,
                               response_model: Any = None) -> int:
        return 10


def build_crew(label: str, count: Counter, pause: Pause, *, order: str = "o1",
               refund_needs_approval: bool = False) -> Crew:
    """Four model calls; an idempotent lookup, a non-idempotent refund, a note."""

    @tool("lookup")
    def lookup(order: str) -> str:
        """Look an order up."""
        count(f"{label}:lookup")
        pause(f"{label}:lookup")
        return f"order {order}: 42 EUR"

    @tool("refund")
    def refund(order: str, amount: int) -> dict[str, Any]:
        """Refund an order."""
        n = count(f"{label}:refund")
        pause(f"{label}:refund")
        return {"refunded": amount, "order": order, "refund_no": n}

    @tool("note")
    def note(text: str) -> str:
        """Write a note on the ticket."""
        return f"note {text} #{count(f'{label}:note')}"

    script = [
        f'Thought: look it up\nAction: lookup\nAction Input: {{"order": "{order}"}}',
        f'Thought: refund\nAction: refund\nAction Input: {{"order": "{order}", "amount": 42}}',
        'Thought: note it\nAction: note\nAction Input: {"text": "refunded"}',
        "Thought: all done\nFinal Answer: done: ",
    ]
    llm = ScriptedLLM(model="scripted-1", script=script, label=label, counter=count,
                      pauser=pause)
    agent = Agent(role="support", goal="Refund orders", backstory="A careful agent.",
                  llm=llm, tools=[idempotent(lookup),
                                  needs_approval(refund) if refund_needs_approval else refund,
                                  note], verbose=False,
                  max_retry_limit=0)  # CrewAI retries a failed task; see the failing test
    task = Task(description=f"Refund order {order}.", expected_output="What was done.",
                agent=agent)
    return Crew(agents=[agent], tasks=[task], verbose=False)


class NativeLLM(ScriptedLLM):
    """Native function calling: answers `calls[turn]` as tool calls (several in one turn),
    then the tool results it was given, as text."""

    calls: list[list[tuple[str, dict[str, Any]]]] = []

    def call(self, messages: Any, tools: Any = None, callbacks: Any = None,
             available_functions: Any = None, from_task: Any = None, from_agent: Any = None,
             response_model: Any = None) -> Any:
        turn = turn_of(messages)
        self.counter(f"{self.label}:model:{turn}")
        self.pauser(f"{self.label}:model:{turn}")
        self._track_token_usage_internal(usage_of_turn(turn))
        if turn < len(self.calls):
            return [{"id": f"call-{turn}-{i}", "type": "function",
                     "function": {"name": name, "arguments": json.dumps(args)}}
                    for i, (name, args) in enumerate(self.calls[turn])]
        return "done: " + json.dumps([m.get("content") for m in messages
                                      if m.get("role") == "tool"])

    def supports_function_calling(self) -> bool:
        return True


def build_native_crew(label: str, count: Counter, pause: Pause) -> Crew:
    """Three model calls: a lookup and a note asked for in one turn, then the refund."""
    crew = build_crew(label, count, pause)
    agent = crew.agents[0]
    agent.llm = NativeLLM(model="native-1", script=[], label=label, counter=count,
                          pauser=pause, calls=[
                              [("lookup", {"order": "o1"}), ("note", {"text": "seen"})],
                              [("refund", {"order": "o1", "amount": 42})]])
    return crew
