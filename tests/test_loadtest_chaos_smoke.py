"""One new fault kind through the real chaos module (`python -m loadtest.chaos --quick`): a
store outage, a real TCP cut between the workers and their Redis store, mid-load. Smoke
figures only (the full run is `python -m loadtest.chaos`): the run must finish, find the cut
and the return, lose nothing, charge nothing under two keys, and account for every
checkpoint the bodies made."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import need_redis

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


def test_a_quick_store_outage_run_loses_nothing_and_reports_its_figures(tmp_path: Path) -> None:
    need_redis()
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest.chaos", "--quick", "--faults", "store-outage",
         "--stores", "redis", "--executions", "12", "--store-outage-s", "4", "--skip-alone",
         "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads((tmp_path / "chaos.json").read_text())
    [report] = result["runs"]
    assert "error" not in report, report.get("error")
    assert (report["fault"], report["variant"], report["store"]) == (
        "store-outage", "defaults", "redis")
    outage = report["outage"]
    assert outage["connections_reset"] >= 1  # the workers were connected through the proxy
    assert outage["outage_s"] >= 4 and outage["drain_s"] is not None, outage
    assert report["outcomes"]["lost"] == [], report["outcomes"]
    assert report["side_effects"]["distinct_key_duplicates"] == 0
    records = report["records"]
    assert records["checkpoints_made"] > 0 and records["processes_reporting"] >= 1
    assert records["records_lost"] == 0, records["lost_markers"]
    assert report["memory"]["peak_rss_total_mib"] > 0
    [row] = result["summary"]
    checks = result["checks"]["defaults store-outage redis"]
    assert {"lost == 0", "records lost == 0", "drained"} <= set(checks)
    assert any(name.startswith("longest hold < ") for name in checks)  # the budget in force
    assert row["hold_max_ms"] is not None and row["drain_s"] == outage["drain_s"]
    assert "store-outage" in proc.stdout  # the table names the fault kind
