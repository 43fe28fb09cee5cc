"""The benchmark's CLI runs end to end and writes its results (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _loadtest(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtest", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.timeout(300)
def test_quick_single_on_sqlite_writes_the_json(tmp_path: Path) -> None:
    proc = _loadtest("all", "--quick", "--only", "single", "--stores", "sqlite",
                     "--no-baseline", "--out", str(tmp_path), timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]

    data = json.loads((tmp_path / "results.json").read_text())
    assert {"run", "machine", "codecs", "workloads", "targets"} <= set(data)
    assert data["run"]["quick"] is True and data["run"]["baseline"] is False
    assert data["run"]["stores"] == ["sqlite"]
    assert data["run"]["load_average_start"] is not None
    assert data["run"]["load_average_end"] is not None
    assert {"cpu_count", "cpu_model", "memory_gib", "python", "packages"} <= set(data["machine"])
    assert {"zlib-6", "zstd-3"} <= set(data["codecs"]["codecs"])

    rows = data["workloads"]["single"]["rows"]
    assert set(rows) == {"sqlite 250KB", "sqlite 50KB"}
    for row in rows.values():
        ours = row["ours"]
        for key in ("held_p50_ms", "held_p95_ms", "held_p99_ms", "within_budget", "ack_p50_ms",
                    "ack_p99_ms", "hot_read_p50_ms", "cold_first_ms", "cold_read_p50_ms",
                    "durable", "recovered"):
            assert key in ours, key
        # Correctness, not timing: every checkpoint read back byte-exact by a fresh process.
        assert ours["durable"] == 1.0 and ours["recovered"] == 1.0
        assert row["livingai"] is None
    assert (tmp_path / "summary.txt").read_text().strip()
    assert not list(tmp_path.rglob("*.db")), "SQLite store files are removed after the run"


@pytest.mark.parametrize(("args", "message"), [
    (["all", "--stores", "sqlite,mysql"], "unknown store 'mysql'; choose from sqlite"),
    (["all", "--only", "singel"], "unknown workload 'singel'; choose from single"),
    (["bogus"], "invalid choice: 'bogus'"),
])
def test_a_bad_argument_exits_2_with_one_clear_line(tmp_path: Path, args: list[str],
                                                    message: str) -> None:
    proc = _loadtest(*args, "--out", str(tmp_path), timeout=60) if args[0] == "all" else \
        _loadtest(*args, timeout=60)
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert message in last, proc.stderr
    assert not (tmp_path / "results.json").exists()
