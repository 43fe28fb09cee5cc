"""The journaling core of the OpenAI Agents SDK adapter: an SDK coroutine (a model request,
a tool invocation) run as a journaled call of the running step, and the JSON the journal
records of model responses and tool results.

The SDK is asynchronous and the journal synchronous: a call's bookkeeping (lai.call) runs
in an executor thread that sees the step's context, while the request or tool itself runs
as usual on the run's event loop, in its task (its HTTP client stays on one loop, its
context variables are the run's). Journaled calls of one run are serialized (a lock taken
in arrival order), so concurrent tool calls of one turn run one after the other and a
re-run meets them in the same order.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
from collections.abc import Awaitable, Callable
from typing import Any

from agents import ModelResponse
from agents.items import TResponseOutputItem
from agents.tool import ToolOutputFileContent, ToolOutputImage, ToolOutputText
from agents.usage import deserialize_usage, serialize_usage
from pydantic import BaseModel, TypeAdapter

from ...celery_wing import context as lai_context
from ...celery_wing.journal import call as journal_call
from ...errors import LivingAIError

__all__ = ["RunScope", "RUN", "journaled", "response_to_json", "response_from_json",
           "tool_result_to_json", "tool_result_from_json"]

_OUTPUT_ITEM: TypeAdapter[Any] = TypeAdapter(TResponseOutputItem)
# A tool result of these types is recorded with its type's name and rebuilt from this list
# only (a record never names a class to import).
_TOOL_OUTPUTS: dict[str, type[BaseModel]] = {
    cls.__name__: cls for cls in (ToolOutputText, ToolOutputImage, ToolOutputFileContent)}
_TYPED = "__openai_agents_type__"


class RunScope:
    """One run_durably call: its lock (one journaled call at a time, in arrival order) and
    the library error that must end the step whatever the SDK makes of it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.fatal: BaseException | None = None


# Set by run_durably for the length of a run (the SDK's tasks copy it).
RUN: contextvars.ContextVar[RunScope | None] = contextvars.ContextVar("lai_oai_run",
                                                                    default=None)
# Set while a journaled call's body runs: a call nested in it (an agent used as a tool
# makes model calls) is part of its result and is not journaled on its own.
_IN_CALL: contextvars.ContextVar[bool] = contextvars.ContextVar("lai_oai_in_call",
                                                                default=False)


async def journaled(make: Callable[[], Awaitable[Any]], encode: Callable[[Any], Any],
                     request: Any, **options: Any) -> Any:
    """Run `make()` as a journaled call of the running step and return its encoded (JSON)
    result, the recorded one on a re-run. Outside run_durably, or nested in another
    journaled call, it just runs."""
    run = RUN.get()
    step = lai_context.local.step
    if run is None or step is None or _IN_CALL.get():
        return encode(await make())
    loop = asyncio.get_running_loop()
    started: asyncio.Future[None] = loop.create_future()
    finished: concurrent.futures.Future[Any] = concurrent.futures.Future()

    def live(_request: Any) -> Any:  # in the executor thread, inside lai.call
        loop.call_soon_threadsafe(_settle, started)
        return finished.result()

    def bookkeeping() -> Any:  # the journal reads the step from a thread-local
        lai_context.local.step = step
        try:
            return journal_call(live, request, **options)
        finally:
            lai_context.local.step = None

    async with run.lock:
        helper = loop.run_in_executor(None, bookkeeping)
        try:
            await asyncio.wait({helper, started}, return_when=asyncio.FIRST_COMPLETED)
            if started.done() and not helper.done():
                token = _IN_CALL.set(True)
                try:
                    finished.set_result(encode(await make()))
                except BaseException as exc:
                    finished.set_exception(exc)
                finally:
                    _IN_CALL.reset(token)
            return await helper
        except LivingAIError as exc:
            run.fatal = run.fatal or exc
            raise
        finally:
            if not finished.done():
                finished.set_exception(asyncio.CancelledError())


def _settle(started: asyncio.Future[None]) -> None:
    if not started.done():
        started.set_result(None)


# -- model responses as JSON ---------------------------------------------------------------

def response_to_json(response: ModelResponse) -> dict[str, Any]:
    """A ModelResponse as JSON the journal records (its output items dumped by pydantic)."""
    items: list[Any] = []
    raw: list[int] = []
    for i, item in enumerate(response.output):
        if isinstance(item, BaseModel):
            # By alias (a field named `async` is `async_` in Python) and only the fields
            # that were set: the rebuilt item then dumps, and is sent back to the model,
            # exactly as the original.
            items.append(item.model_dump(mode="json", by_alias=True, exclude_unset=True))
        else:  # a mapping some providers put there: kept as it is, and rebuilt as one
            items.append(item)
            raw.append(i)
    return {"output": items, "raw_items": raw, "usage": serialize_usage(response.usage),
            "response_id": response.response_id, "request_id": response.request_id,
            "raw_usage": response.raw_usage}


def response_from_json(data: dict[str, Any]) -> ModelResponse:
    """The ModelResponse recorded by response_to_json, rebuilt (pydantic validation)."""
    raw = set(data.get("raw_items") or ())
    output = [item if i in raw else _OUTPUT_ITEM.validate_python(item)
              for i, item in enumerate(data["output"])]
    return ModelResponse(output=output, usage=deserialize_usage(data["usage"]),
                         response_id=data.get("response_id"),
                         request_id=data.get("request_id"), raw_usage=data.get("raw_usage"))


def tool_result_to_json(result: Any) -> Any:
    """A tool's result as JSON: the SDK's ToolOutput* models keep their type; another
    pydantic model becomes its JSON dump (the model then sees the same text either way)."""
    if isinstance(result, BaseModel):
        dumped = result.model_dump(mode="json")
        name = type(result).__name__
        return {_TYPED: name, "value": dumped} if _TOOL_OUTPUTS.get(name) is type(result) \
            else dumped
    if isinstance(result, (list, tuple)):
        return [tool_result_to_json(r) for r in result]
    return result


def tool_result_from_json(data: Any) -> Any:
    if isinstance(data, dict) and set(data) == {_TYPED, "value"} and data[_TYPED] in \
            _TOOL_OUTPUTS:
        return _TOOL_OUTPUTS[data[_TYPED]].model_validate(data["value"])
    if isinstance(data, list):
        return [tool_result_from_json(d) for d in data]
    return data




