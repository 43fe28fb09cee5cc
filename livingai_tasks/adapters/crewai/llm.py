"""JournaledLLM: a CrewAI `BaseLLM` whose every call is a journaled model call of the step.

Wrapping the LLM, not CrewAI's before/after_llm_call hooks: a hook can block a call but not
answer it, and a re-run must answer from the record without asking the model. What is
recorded is what CrewAI gets back (text, a structured-output model, or native tool calls as
OpenAI-style dicts), with the call's token usage, so a live call and a replayed one hand the
agent the same thing and the crew's token counts come out the same.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from crewai.llms.base_llm import BaseLLM, call_stop_override
from crewai.types.usage_metrics import UsageMetrics
from crewai.utilities.agent_utils import extract_tool_call_info, is_tool_call_list
from pydantic import BaseModel, Field

from ...errors import ConfigError
from . import _framework  # noqa: F401  (the missing-extra error)
from .scope import in_step, journaled
from .wrap import JournaledTool

__all__ = ["JournaledLLM", "journaled_llm"]

# UsageMetrics' counters, which BaseLLM keeps per instance and a crew sums.
_COUNTERS = tuple(UsageMetrics.model_fields)


def _mark_unretried(method: Any) -> Any:
    # BaseLLM wraps a subclass's call/acall in CrewAI's rate-limit retry. Around a journaled
    # call each retry would be a call of its own; the wrapped LLM retries inside one call.
    method._crewai_rate_limit_wrapped = True
    return method


class JournaledLLM(BaseLLM):
    """Wraps a CrewAI LLM (`LLM(...)` or any BaseLLM): each `call` is a journaled call (kind
    "model", idempotent: a call lost in a crash is asked again) named `model:<model>`."""

    llm_type: str = "livingai-journaled"
    inner: BaseLLM = Field(exclude=True)

    @classmethod
    def wrap(cls, llm: BaseLLM) -> JournaledLLM:
        if isinstance(llm, JournaledLLM):
            return llm
        if not isinstance(llm, BaseLLM):
            raise ConfigError(f"JournaledLLM wraps a crewai BaseLLM (crewai.LLM(...) or a "
                              f"subclass), got {llm!r}.")
        return cls(model=llm.model, provider=llm.provider, inner=llm, stop=list(llm.stop),
                   temperature=llm.temperature, is_litellm=llm.is_litellm, stream=False)

    # -- the journaled call -----------------------------------------------------------

    @_mark_unretried
    def call(self, messages: Any, tools: list[dict[str, Any]] | None = None,
             callbacks: list[Any] | None = None,
             available_functions: dict[str, Any] | None = None, from_task: Any = None,
             from_agent: Any = None, response_model: type[BaseModel] | None = None) -> Any:
        if available_functions:  # checked in the step: CrewAI would retry past the error
            in_step(lambda: _refuse_tools_inside(available_functions, self.model))
        inner = self.inner
        stop = self.stop_sequences  # the executor's stop words, set on this wrapper

        def ask(_request: Any) -> dict[str, Any]:
            before = inner.get_token_usage_summary()
            with call_stop_override(inner, stop):
                answer = inner.call(messages, tools=tools, callbacks=callbacks,
                                    available_functions=available_functions,
                                    from_task=from_task, from_agent=from_agent,
                                    response_model=response_model)
            spent = inner.get_token_usage_summary().delta_since(before)
            record: dict[str, Any] = {"answer": _encode(answer),
                                      "crewai_usage": spent.model_dump()}
            if spent.total_tokens or spent.prompt_tokens or spent.completion_tokens:
                record["usage"] = {"input_tokens": spent.prompt_tokens,
                                   "output_tokens": spent.completion_tokens,
                                   "total_tokens": spent.total_tokens}
            return record

        # What the record shows of the request (a re-run never reads it).
        request = {"messages": messages if isinstance(messages, str) else list(messages),
                   "tools": [_tool_name(t) for t in tools or ()],
                   "response_model": getattr(response_model, "__name__", None)}
        recorded = journaled(ask, request, name=f"model:{self.model}", kind="model",
                             model=self.model, fatal_errors=True)
        for key, value in (recorded.get("crewai_usage") or {}).items():
            if key in _COUNTERS and isinstance(value, int):
                self._token_usage[key] = self._token_usage.get(key, 0) + value
        return _decode(recorded["answer"], response_model)

    @_mark_unretried
    async def acall(self, messages: Any, tools: list[dict[str, Any]] | None = None,
                    callbacks: list[Any] | None = None,
                    available_functions: dict[str, Any] | None = None, from_task: Any = None,
                    from_agent: Any = None, response_model: type[BaseModel] | None = None
                    ) -> Any:
        # The journal is synchronous: the call runs in a thread, which sees the scope.
        return await asyncio.to_thread(
            self.call, messages, tools=tools, callbacks=callbacks,
            available_functions=available_functions, from_task=from_task,
            from_agent=from_agent, response_model=response_model)

    # -- what CrewAI asks of the model: the wrapped LLM's answers ---------------------

    def supports_function_calling(self) -> bool:
        # Not part of BaseLLM's own interface: CrewAI asks for it when it is there.
        check = getattr(self.inner, "supports_function_calling", None)
        return bool(check()) if callable(check) else False

    def supports_stop_words(self) -> bool:
        return bool(self.inner.supports_stop_words())

    def supports_multimodal(self) -> bool:
        return bool(self.inner.supports_multimodal())

    def get_context_window_size(self) -> int:
        return int(self.inner.get_context_window_size())

    def get_input_tokens_count(self, messages: Any, tools: Any = None,
                               response_model: Any = None) -> int:
        return int(self.inner.get_input_tokens_count(messages, tools, response_model))

    def to_config_dict(self) -> dict[str, Any]:
        return self.inner.to_config_dict()


def journaled_llm(llm: Any) -> Any:
    """`llm` journaled if it is a CrewAI BaseLLM (already journaled: as it is); anything
    else (None, a model name CrewAI has not resolved yet) unchanged."""
    return JournaledLLM.wrap(llm) if isinstance(llm, BaseLLM) else llm


def _refuse_tools_inside(functions: dict[str, Any] | None, model: str) -> None:
    """A model call given functions runs them itself (CrewAI's plan-and-execute steps), as
    part of one idempotent model call that a re-run may repeat: refused for a tool that must
    not run twice."""
    for name, fn in (functions or {}).items():
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, JournaledTool) and not owner.idempotent:
            raise ConfigError(
                f"Model {model!r} was asked to run tool {name!r} inside its call (CrewAI's "
                "plan-and-execute mode): a re-run could repeat the call and the tool with "
                "it. Run the agent without planning/reasoning, or mark the tool idempotent.")


def _tool_name(schema: Any) -> str:
    if isinstance(schema, dict):
        function = schema.get("function")
        if isinstance(function, dict):
            return str(function.get("name"))
        return str(schema.get("name"))
    return type(schema).__name__


# -- answers as JSON ------------------------------------------------------------------------

def _encode(answer: Any) -> dict[str, Any]:
    if isinstance(answer, str):
        return {"text": answer}
    if isinstance(answer, BaseModel):
        return {"structured": answer.model_dump(mode="json")}
    if isinstance(answer, list) and is_tool_call_list(answer):
        # Native tool calls as OpenAI-style dicts, which CrewAI reads from every provider:
        # ids it would make up per run (Gemini's) are fixed once recorded.
        calls = []
        for item in answer:
            info = extract_tool_call_info(item)
            if info is None:
                raise ConfigError(f"A tool call of the model's answer is in no format "
                                  f"CrewAI reads: {item!r}.")
            call_id, name, arguments = info
            calls.append({"id": call_id, "type": "function", "function": {
                "name": name, "arguments": arguments if isinstance(arguments, str)
                else _json_text(arguments)}})
        return {"tool_calls": calls}
    if answer is None or isinstance(answer, (dict, list, int, float, bool)):
        return {"json": answer}
    raise ConfigError(f"The model answered with a {type(answer).__name__} ({answer!r:.200}); "
                      "the journal records text, structured output, tool calls or JSON.")


def _decode(encoded: dict[str, Any], response_model: type[BaseModel] | None) -> Any:
    if "text" in encoded:
        return encoded["text"]
    if "structured" in encoded:
        if response_model is None:
            return encoded["structured"]
        return response_model.model_validate(encoded["structured"])
    if "tool_calls" in encoded:
        return encoded["tool_calls"]
    return encoded.get("json")


def _json_text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)
