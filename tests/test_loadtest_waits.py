"""`python -m loadtest.waits`: its answers to bad arguments, and a quick run on a real fleet
(Redis store and broker) that must account for every wait. Correctness only, never timing:
on this shared 2-core machine the figures of a quick run mean little."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import need_redis

ROOT = Path(__file__).resolve().parent.parent


def _waits(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtest.waits", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("args", "message"), [
    (["--stores", "redis,mysql"],
     "unknown store 'mysql'; choose from sqlite, redis, postgres, tiered"),
    (["--executions", "0"], "argument --executions: expected a whole number >= 1, got '0'"),
    (["--timeout-s", "nan"], "argument --timeout-s: expected a number of seconds >= 0, got 'nan'"),
])
def test_a_bad_argument_exits_2_before_starting_anything(tmp_path: Path, args: list[str],
                                                         message: str) -> None:
    proc = _waits(*args, "--out", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr.strip().splitlines()[-1], proc.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_quick_run_holds_no_slot_and_resumes_every_wait_once(tmp_path: Path) -> None:
    need_redis()
    proc = _waits("--quick", "--stores", "redis", "--executions", "40", "--latency-samples",
                  "10", "--ticks", "3", "--out", str(tmp_path), timeout=280)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads((tmp_path / "waits.json").read_text())
    report = result["stores"]["redis"]
    assert "error" not in report, report.get("error")
    assert report["create"]["waiting"] == 40
    waiting = report["waiting"]
    # Every worker answered, and none runs or holds a task while 40 executions wait.
    assert waiting["slots"]["workers_answering"] == 3
    assert (waiting["slots"]["active"], waiting["slots"]["reserved"]) == (0, 0)
    assert waiting["fresh_ms"]["n"] == 8  # fresh executions ran on the same slots
    assert waiting["resumed_before_any_send"] == 0
    # The waits live in the store, not in the broker: real keys per wait, and the ticks
    # found nothing to resume or wake (the deadlines are an hour away).
    assert report["per_execution"]["redis"]["keys"] >= 1
    assert report["per_execution"]["redis"]["bytes"] > 0
    for state in ("empty", "waiting", "completed"):
        assert report[state]["tick"]["total_ms"]["n"] == 3
    assert report["waiting"]["tick"]["found"] == {"scanned": 0, "claimed": 0, "woken": 0,
                                                  "repaired": 0}
    assert report["latency"]["to_body_start_ms"]["n"] == 10
    assert report["timers"]["n"] == 10  # the tick woke every timeout
    drain = report["drain"]
    assert (drain["resumed"], drain["resumed_twice"]) == (40, 0)
    assert report["completed"]["waiting_left"] == 0
    checks = result["checks"]["redis"]
    for name in ("slots held == 0", "none resumed before its event", "all resumed",
                 "none resumed twice", "none left waiting"):
        assert checks[name], name
    assert "redis" in proc.stdout and "slots held" in proc.stdout  # the table
