"""A LangGraph agent for the adapter's tests, offline: a scripted chat model (LangChain's
GenericFakeChatModel, with bind_tools) that answers by turn, a non-idempotent refund tool
node and a summarizing model node. Hooks let each test count calls (in memory or Redis)
and stop at a precise point."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langgraph.graph import END, START, MessagesState, StateGraph
from langgraph.types import interrupt

from livingai_tasks.adapters.langgraph import durable_graph

MODEL = "fake-chat-1"


def usage(turn: int) -> dict[str, int]:
    return {"input_tokens": 100 + turn, "output_tokens": 10 * (turn + 1),
            "total_tokens": 100 + turn + 10 * (turn + 1)}


def scripted_reply(turn: int) -> AIMessage:
    meta = {"usage_metadata": usage(turn), "response_metadata": {"model_name": MODEL}}
    if turn == 0:
        return AIMessage(content="", tool_calls=[
            {"name": "refund", "args": {"amount": 42}, "id": "call-1"}], **meta)
    if turn == 1:
        return AIMessage(content="I refunded 42.", **meta)
    return AIMessage(content="Summary: the customer got 42 back.", **meta)


class ScriptedChat(GenericFakeChatModel):
    """GenericFakeChatModel answering by turn (the number of AI messages so far), so every
    process gives the same reply to the same conversation (a worker that takes over a run
    has no iterator state to share); `on_call(turn)` counts each real call."""

    on_call: Callable[[int], None] = lambda turn: None

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> ScriptedChat:
        return self  # the script knows its tools

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: Any = None, **kwargs: Any) -> ChatResult:
        turn = sum(isinstance(m, AIMessage) for m in messages)
        self.on_call(turn)
        return ChatResult(generations=[ChatGeneration(message=scripted_reply(turn))])


class AgentState(MessagesState):
    run: str


def build(on_model: Callable[[str, int], None], on_refund: Callable[[str, int], Any],
          *, ask_first: bool = False) -> Any:
    """The durable graph: agent (model) -> tools (refund, non-idempotent) -> agent ->
    summarize (model). With ask_first, the tools node asks a person (interrupt) before
    refunding. on_refund(run, amount) is the refund's real effect."""

    def agent(state: AgentState) -> dict[str, Any]:
        model = ScriptedChat(messages=iter(()), on_call=lambda t: on_model(state["run"], t))
        return {"messages": [model.bind_tools([]).invoke(state["messages"])]}

    def tools(state: AgentState) -> dict[str, Any]:
        last = state["messages"][-1]
        assert isinstance(last, AIMessage)
        out = []
        for tool_call in last.tool_calls:
            amount = tool_call["args"]["amount"]
            if ask_first and interrupt({"refund": amount}) != "yes":
                out.append(ToolMessage("refused by a person", tool_call_id=tool_call["id"]))
                continue
            receipt = on_refund(state["run"], amount)
            out.append(ToolMessage(json.dumps(receipt), tool_call_id=tool_call["id"]))
        return {"messages": out}

    def route(state: AgentState) -> str:
        last = state["messages"][-1]
        return "tools" if isinstance(last, AIMessage) and last.tool_calls else "summarize"

    builder = StateGraph(AgentState)
    builder.add_node("agent", agent, metadata={"kind": "model"})
    builder.add_node("tools", tools, metadata={"idempotent": False})
    builder.add_node("summarize", agent, metadata={"kind": "model"})
    builder.add_edge(START, "agent")
    builder.add_conditional_edges("agent", route, ["tools", "summarize"])
    builder.add_edge("tools", "agent")
    builder.add_edge("summarize", END)
    return durable_graph(builder)


def start_state(topic: str, run: str) -> dict[str, Any]:
    return {"messages": [HumanMessage(topic)], "run": run}


def as_json(out: dict[str, Any]) -> dict[str, Any]:
    """A step's output: the conversation as JSON."""
    return {"run": out["run"],
            "messages": [[m.type, m.content] for m in out["messages"]]}
