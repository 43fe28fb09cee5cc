"""A scripted OpenAI Agents SDK agent for the adapter's tests: a fake Model whose answer is
a function of the conversation so far (a re-run in another process gets the same one), and
tools whose effects are counted by the caller's `count` (a dict in eager tests, Redis on
real workers). No network, no API key."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from agents import Agent, FunctionTool, Model, ModelResponse, Usage, function_tool
from agents.testing import assistant_message, function_call

from livingai_tasks.adapters.openai_agents import idempotent

# Number of function calls already in the conversation -> the model's turn.
_TURN_OF = {0: 0, 1: 1, 2: 2, 4: 3}


def _kind(item: Any) -> Any:
    return item.get("type") if isinstance(item, dict) else getattr(item, "type", None)


def turn_of(input: Any) -> int:
    calls = 0 if isinstance(input, str) else sum(_kind(i) == "function_call" for i in input)
    return _TURN_OF[calls]


def usage_of_turn(turn: int) -> Usage:
    return Usage(requests=1, input_tokens=100 + turn, output_tokens=10 * (turn + 1),
                 total_tokens=100 + turn + 10 * (turn + 1))


class ScriptedCountingModel(Model):
    """Turn 0 looks the order up, turn 1 refunds it, turn 2 writes two notes at once (two
    parallel tool calls), turn 3 answers with every tool output it was given."""

    def __init__(self, label: str, count: Callable[[str], Any],
                 pause: Callable[[str], Any] = lambda _: None, order: str = "o1") -> None:
        self.label, self.count, self.pause, self.order = label, count, pause, order

    async def get_response(self, system_instructions: Any, input: Any, model_settings: Any,
                           tools: Any, output_schema: Any, handoffs: Any, tracing: Any,
                           **_: Any) -> ModelResponse:
        turn = turn_of(input)
        self.count(f"{self.label}:model")
        self.count(f"{self.label}:model:{turn}")
        self.pause(f"{self.label}:model:{turn}")
        order = self.order
        output: list[Any]
        if turn == 0:
            output = [function_call("lookup", {"order": order}, call_id="c-lookup")]
        elif turn == 1:
            output = [function_call("refund", {"order": order, "amount": 42},
                                    call_id="c-refund")]
        elif turn == 2:
            output = [function_call("note", {"text": "a"}, call_id="c-note-a"),
                      function_call("note", {"text": "b"}, call_id="c-note-b")]
        else:
            outputs = [i["output"] for i in input if _kind(i) == "function_call_output"]
            output = [assistant_message("done: " + json.dumps(outputs), item_id="m-final")]
        return ModelResponse(output=output, usage=usage_of_turn(turn),
                             response_id=f"resp-{turn}")

    def stream_response(self, *args: Any, **kwargs: Any) -> AsyncIterator[Any]:
        raise NotImplementedError("the tests do not stream")


def build_agent(label: str, count: Callable[[str], Any],
                pause: Callable[[str], Any] = lambda _: None, *, order: str = "o1",
                refund_needs_approval: bool = False) -> Agent[Any]:
    """The agent: its model above, an idempotent lookup, a non-idempotent refund (an effect
    counted once per real call) and a note tool."""

    @function_tool
    def lookup(order: str) -> str:
        """Find an order."""
        count(f"{label}:lookup")
        return f"order {order}: 42 EUR"

    @function_tool(needs_approval=refund_needs_approval)
    def refund(order: str, amount: int) -> dict[str, Any]:
        """Refund an order."""
        count(f"{label}:refund")
        pause(f"{label}:refund")
        return {"refunded": amount, "order": order}

    @function_tool
    def note(text: str) -> str:
        """Write a note."""
        n = count(f"{label}:note:{text}")
        return f"note {text} #{n}"

    tools: list[FunctionTool] = [idempotent(lookup), refund, note]
    return Agent(name="support", instructions="Help.", tools=list(tools),
                 model=ScriptedCountingModel(label, count, pause, order))
