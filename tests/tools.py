"""Command-line tools some tests drive (Chromium, a Compose client), as distinct from servers.

A missing server fails a test under LIVINGAI_REQUIRE_SERVICES=1; a missing tool does not,
so the README's test command passes on a fresh machine that has the servers but not these
Debian packages. `.ci/run` installs them and sets LIVINGAI_REQUIRE_TOOLS=1, so there a
missing tool fails instead of skipping the tests that check the browser view and the
compose file.
"""

from __future__ import annotations

import os
import warnings
from typing import NoReturn

import pytest


def require_tool_or_skip(tool: str, why: BaseException | str, install: str) -> NoReturn:
    """Skip (or fail under LIVINGAI_REQUIRE_TOOLS=1) saying what is missing and how to get it."""
    if os.environ.get("LIVINGAI_REQUIRE_TOOLS") == "1":
        pytest.fail(f"{tool} is required (LIVINGAI_REQUIRE_TOOLS=1) but missing: {why}. "
                    f"Install it: {install}", pytrace=False)
    pytest.skip(f"{tool} missing ({why}); install it to run this test: {install}")


def import_crewai_or_skip() -> None:
    """CrewAI, for the adapter's tests: a skip naming the extra where it is not installed
    (the test extra cannot hold it: crewai wants openai<3, the Agents SDK openai>=3), a
    failure in `.ci/run`'s CrewAI job (LIVINGAI_REQUIRE_CREWAI=1), which installs it."""
    # Before CrewAI is imported: no telemetry or tracing, which would try the network.
    os.environ.setdefault("CREWAI_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("OTEL_SDK_DISABLED", "true")
    os.environ.setdefault("CREWAI_TRACING_ENABLED", "false")
    try:
        # As pytest.importorskip does: CrewAI's own import warnings (an ImportWarning from
        # its rag package) are not this project's, and the suite turns warnings into errors.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import crewai  # noqa: F401
    except ImportError as exc:
        if os.environ.get("LIVINGAI_REQUIRE_CREWAI") == "1":
            pytest.fail(f"CrewAI is required (LIVINGAI_REQUIRE_CREWAI=1) but missing: {exc}",
                        pytrace=False)
        pytest.skip("CrewAI is not installed: pip install 'livingai-tasks[crewai]' in a venv "
                    "without the openai-agents extra (`bash .ci/run crewai` does)",
                    allow_module_level=True)
