"""`python -m loadtest.journal`: its answers to bad arguments, and a quick run on a real
fleet (Redis store and broker) whose killed agents must resume without repeating a recorded
model call. Correctness only, never timing: on this shared 2-core machine the figures of a
quick run mean little."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import need_redis

ROOT = Path(__file__).resolve().parent.parent
AGENTS = ["core", "pydantic"] if importlib.util.find_spec("pydantic_ai") else ["core"]


def _journal(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtest.journal", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("args", "message"), [
    (["--stores", "redis,mysql"],
     "unknown store 'mysql'; choose from sqlite, redis, postgres, tiered"),
    (["--agents", "core,crewai"], "argument --agents: unknown agent 'crewai'; choose from "
                                  "core, pydantic"),
    (["--rounds", "0"], "argument --rounds: expected a whole number >= 1, got '0'"),
    (["--lease-s", "-1"], "argument --lease-s: expected a number of seconds > 0, got '-1'"),
])
def test_a_bad_argument_exits_2_before_starting_anything(tmp_path: Path, args: list[str],
                                                         message: str) -> None:
    proc = _journal(*args, "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_quick_run_resumes_killed_agents_without_repeating_a_model_call(
        tmp_path: Path) -> None:
    need_redis()
    proc = _journal("--quick", "--stores", "redis", "--out", str(tmp_path), timeout=220)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads((tmp_path / "journal.json").read_text())
    report = result["stores"]["redis"]
    assert "error" not in report, report.get("error")
    assert result["params"]["agents"] == AGENTS
    for kind in AGENTS:
        runs = report["overhead"]["agents"][kind]["runs"]
        assert (runs["journaled"], runs["plain"]) == (2, 2)  # --quick: 2 rounds
        resumed = report["resume"][kind]
        assert len(resumed["runs"]) == 1
        run = resumed["runs"][0]
        # Killed with 10 calls made and recorded; the resumed run made the other 5, each once.
        assert run["calls_per_turn"] == [1] * 15
        assert run["repeated_model_calls"] == 0
        assert run["body_starts"] == 2
        assert run["output_as_uncrashed"] and run["tokens_as_uncrashed"]
        assert resumed["uncrashed"]["tokens"]["calls"] == 15
    assert all(result["checks"]["redis"].values()), result["checks"]
    assert report["log_problems"] == []
    assert "redis" in proc.stdout and "kill->resumed" in proc.stdout  # the table
