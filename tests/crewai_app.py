"""Agent steps of the CrewAI adapter for the real-worker tests: loaded by the fleet's workers
with `--include tests.crewai_app`, on tests.agent_app's app (its counters in Redis, its
pause flags)."""

from __future__ import annotations

import os
from typing import Any

# Before CrewAI is imported: no telemetry or tracing, which would try the network.
for _name in ("CREWAI_DISABLE_TELEMETRY", "OTEL_SDK_DISABLED"):
    os.environ.setdefault(_name, "true")
os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")

import livingai_tasks as lai  # noqa: E402
from livingai_tasks.adapters.crewai import kickoff_durably  # noqa: E402
from tests.agent_app import _pause, app, count  # noqa: E402
from tests.crewai_fake import build_crew  # noqa: E402


@lai.agent_step(app)
def crew_support(order: str, label: str) -> dict[str, Any]:
    """Four model calls, an idempotent lookup, a non-idempotent refund, a note."""
    out = kickoff_durably(build_crew(label, count, _pause, order=order))
    return {"answer": out.raw, "tokens": out.token_usage.total_tokens}


@lai.agent_step(app)
def crew_approval(order: str, label: str) -> dict[str, Any]:
    """The same crew, its refund needing approval (the step waits for it)."""
    out = kickoff_durably(build_crew(label, count, _pause, order=order,
                                     refund_needs_approval=True))
    return {"answer": out.raw, "tokens": out.token_usage.total_tokens}
