"""The main job, end to end: `livingai-tasks demo` on the embedded default (no server)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from .test_cli import CLI, ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def test_demo_crashes_a_worker_and_every_execution_completes_charged_once(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIVINGAI_")}
    out = subprocess.run([CLI, "demo", "--executions", "4", "--step-seconds", "0.3",
                          "--workdir", str(tmp_path), "--timeout", "150", "--json"],
                         capture_output=True, text=True, timeout=200, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)
    assert summary["ok"] is True
    assert summary["completed"] == summary["total"] == 4
    assert summary["charged_exactly_once"] and sorted(summary["charges"].values()) == [1] * 4
    assert summary["killed_worker"] in ("worker1", "worker2")
    assert len(summary["resume_s"]) >= 1  # the killed step was found and published again
    assert (tmp_path / "store.db").exists() and (tmp_path / "broker.db").exists()
