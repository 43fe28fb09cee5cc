"""`python -m loadtest all --quick`, the suite as a user runs it: every workload on every
store, against livingai 0.4.1 when it is installed (the test extra installs it), on the real
servers and real worker processes. Run once per session; each test reads its part of the
results.

Correctness only, never timing: on this shared 2-core machine the figures of a quick run
mean little, but every checkpoint must read back from a fresh process, every recorded chain
must be complete, nothing may be lost or charged twice, at any speed.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest.chaos.faults import FAULT_KINDS

from .conftest import need_postgres, need_redis

ROOT = Path(__file__).resolve().parent.parent
STORES = ["sqlite", "redis", "postgres", "tiered"]
WORKLOADS = ["single", "production", "hyperscale", "fleet", "chaos"]
BASELINE = importlib.util.find_spec("livingai") is not None

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    need_redis()
    need_postgres()
    out = tmp_path_factory.mktemp("loadtest-all")
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "all", "--quick", "--out", str(out),
         *([] if BASELINE else ["--no-baseline"])],
        cwd=ROOT, capture_output=True, text=True, timeout=1440)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n" \
                                 f"{proc.stderr[-4000:]}"
    return json.loads((out / "results.json").read_text()), out


def test_every_workload_ran_on_every_store(run: tuple[dict[str, Any], Path]) -> None:
    data, out = run
    assert data["run"]["quick"] is True and data["run"]["baseline"] is BASELINE
    assert data["run"]["stores"] == STORES and data["run"]["skipped_stores"] == {}
    assert data["run"]["workloads"] == WORKLOADS and data["run"]["skipped_workloads"] == {}
    assert {"cpu_count", "cpu_model", "memory_gib", "python", "packages"} <= set(data["machine"])
    assert data["run"]["load_average_start"] and data["run"]["load_average_end"]
    assert data["targets"], "the targets table is empty"
    assert (out / "summary.txt").read_text().strip()
    for name in ("latency.png", "fleet-chaos.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    # The fleet and chaos runs also write their own files, which their chart is drawn from.
    for name in ("fleet", "chaos"):
        assert json.loads((out / f"{name}.json").read_text())["summary"] == \
            data["workloads"][name]["summary"], name
    assert not (out / "stores").exists()  # every store file was removed after its run


@pytest.mark.parametrize("workload", ["single", "production", "hyperscale"])
def test_every_checkpoint_reads_back_from_a_fresh_process(run: tuple[dict[str, Any], Path],
                                                          workload: str) -> None:
    rows = run[0]["workloads"][workload]["rows"]
    assert {label.split()[0] for label in rows} == set(STORES)
    for label, row in rows.items():
        ours = row["ours"]
        assert ours["saves"] > 0 and ours["save_errors"] == 0, (label, ours)
        assert ours["durable"] == 1.0 and ours["recovered"] == 1.0, (label, ours)
        # CPU inside save() is timed around the same calls as the wall time: never more.
        assert 0 <= ours["save_cpu_p99_ms"] <= ours["wall_p99_ms"] + 0.05, (label, ours)
        if row["livingai"] is not None:
            assert row["livingai"]["save_cpu_p99_ms"] is None, label
        # A burst row also runs, through the same threads, a save that only burns our
        # save's median CPU time.
        floor = row.get("floor")
        if label.endswith("burst"):
            assert floor["saves"] == ours["saves"] and floor["cpu_ms"] > 0, (label, floor)
            # It burns at least that much: never held less than it.
            assert floor["held_p50_ms"] >= floor["cpu_ms"] * 0.99, (label, floor)
            assert 0 <= floor["held_p50_ms"] <= floor["held_max_ms"], (label, floor)
            assert 0 <= floor["within_budget"] <= 1, (label, floor)
        else:
            assert floor is None, label
        # livingai has no tiered store; every other row runs it on the same inputs.
        assert (row["livingai"] is not None) == (BASELINE and not label.startswith("tiered")), \
            label


def test_fleet_recorded_every_chain_and_charged_once(run: tuple[dict[str, Any], Path]) -> None:
    fleet = run[0]["workloads"]["fleet"]
    assert {row["store"] for row in fleet["summary"]} == set(STORES)
    for b in fleet["batches"]:
        assert b["error"] is None, b
        assert b["finished_chains"] == b["chains"] > 0
        assert b["side_effects"] == b["chains"] and b["duplicate_side_effects"] == 0, b
        if b["variant"] == "lai":  # a fast run that recorded nothing is not a result
            assert b["recorded_nodes"] == b["chains"] * 5, b
            assert b["completed_executions"] == b["chains"], b
    assert not fleet["problems"], fleet["problems"]


def test_chaos_lost_nothing_and_charged_nothing_twice(run: tuple[dict[str, Any], Path]) -> None:
    chaos = run[0]["workloads"]["chaos"]
    # Quick: every fault kind once, on the first store, at the library's defaults.
    assert [(r["fault"], r["variant"]) for r in chaos["runs"]] == [
        (f, "defaults") for f in FAULT_KINDS]
    for report in chaos["runs"]:
        assert "error" not in report, report.get("error")
        outcomes, effects = report["outcomes"], report["side_effects"]
        assert report["records"]["checkpoints_made"] > 0
        assert sum(outcomes["by_status"].values()) == report["executions"] > 0
        if report["fault"].startswith("sigkill"):
            # What the library already guarantees under SIGKILLs.
            assert report["resumes"]["kills"] >= 1
            assert outcomes["lost"] == [] and not outcomes["inconsistent"], outcomes
            assert effects["duplicates"] == 0, effects
            assert not effects["runs_charged_under_distinct_keys"], effects
            assert not effects["completed_without_side_effect"]
            assert not report["worker_log_problems"], report["worker_log_problems"]
        # The other kinds are measured, not yet judged here (issues 17 and 18 are open):
        # the fault must have happened as described.
        elif report["fault"] == "sigstop":
            [stop] = report["kill_log"]
            pause_s = chaos["params"]["variants"]["defaults"]["sigstop_pause_s"]
            assert stop["mode"] == "stop" and stop["until"] - stop["t"] >= pause_s
        else:
            outage = report["outage"]
            assert outage["restored_at"] is not None and outage["connections_reset"] >= 1
    alone = chaos["celery_alone"]
    assert "error" not in alone and alone["executions"] > 0 and len(alone["kills"]) >= 1
