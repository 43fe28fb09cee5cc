"""Smoke tests of the fleet and chaos workloads (loadtest/fleet.py, loadtest/chaos.py): each
runs end to end in a subprocess, on real worker processes and the real Redis broker, and
writes JSON that makes sense. Not timing tests: the figures of a quick run on a shared
machine mean little; correctness (nothing lost, nothing charged twice, every step recorded)
holds at any speed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import need_redis

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _run(name: str, out: Path, *args: str) -> dict[str, Any]:
    need_redis()
    proc = subprocess.run(
        [sys.executable, "-m", f"loadtest.{name}", "--quick", "--out", str(out), *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=170,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n" \
                                 f"{proc.stderr[-5000:]}"
    data: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    return data


def test_fleet_quick(tmp_path: Path) -> None:
    data = _run("fleet", tmp_path, "--stores", "redis", "--chains", "20")
    [row] = data["summary"]
    assert row["store"] == "redis" and row["plain_steps_s"] > 0 and row["lai_steps_s"] > 0
    assert row["ratio"] > 0 and "overhead_ms" in row
    batches = data["batches"]
    assert {b["variant"] for b in batches} == {"plain", "plain-tuned", "lai"}
    for b in batches:
        assert b["error"] is None, b
        assert b["finished_chains"] == b["chains"] == 20
        assert b["side_effects"] == 20 and b["duplicate_side_effects"] == 0
        if b["variant"] == "lai":  # a fast run that recorded nothing is not a result
            assert b["recorded_nodes"] == 20 * 5 and b["completed_executions"] == 20


def test_chaos_quick(tmp_path: Path) -> None:
    from loadtest.chaos_record import FIRST_STEP_UNRECORDED

    data = _run("chaos", tmp_path)
    [run] = data["runs"]
    assert "error" not in run, run.get("error")
    assert run["resumes"]["kills"] >= 1
    effects = run["side_effects"]
    assert effects["duplicates"] == 0 and not effects["runs_charged_more_than_once"]
    assert not effects["completed_without_side_effect"]
    outcomes = run["outcomes"]
    assert not outcomes["inconsistent"], outcomes["inconsistent"]
    assert not run["worker_log_problems"], run["worker_log_problems"]
    assert run["resumes"]["steps_not_resumed"] == [] or outcomes["in_doubt"]
    alone = data["celery_alone"]
    assert "error" not in alone and alone["executions"] > 0 and len(alone["kills"]) >= 1
    assert alone["duplicate_side_effects"] == 0
    lost = outcomes["lost"]
    unexplained = [x for x in lost if x["kind"] != FIRST_STEP_UNRECORDED]
    assert not unexplained, unexplained
    if lost:  # a known gap of the library, reported; anything else lost fails above
        pytest.xfail(f"{len(lost)} execution(s) lost: {FIRST_STEP_UNRECORDED}")
