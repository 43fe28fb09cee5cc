"""The benchmark CLI's answers to bad arguments (the whole suite runs in
test_loadtest_all_quick.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _loadtest(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "loadtest", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize(("args", "message"), [
    (["all", "--stores", "sqlite,mysql"], "unknown store 'mysql'; choose from sqlite"),
    (["all", "--only", "singel"], "unknown workload 'singel'; choose from single"),
    (["all", "--unencoded-max-mib", "0"], "expected a whole number >= 1, got '0'"),
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


@pytest.mark.parametrize(("module", "args", "message"), [
    ("loadtest.fleet", ["--works", "cpu,gpu"],
     "unknown work 'gpu'; choose from noop, cpu, llm5, llm20, llm200"),
    ("loadtest.fleet", ["--stores", "redis,mysql"],
     "unknown store 'mysql'; choose from sqlite, redis, postgres, tiered"),
    ("loadtest.chaos", ["--stores", "mysql"],
     "unknown store 'mysql'; choose from sqlite, redis, postgres, tiered"),
    ("loadtest.chaos", ["--faults", "sigkill-worker,sigterm"],
     "argument --faults: unknown fault 'sigterm'; choose from sigkill-child, sigkill-worker, "
     "sigstop, store-outage, broker-outage"),
    ("loadtest.chaos", ["--faults", " , "],
     "argument --faults: no fault named; choose from sigkill-child"),
    ("loadtest.chaos", ["--store-outage-s", "0"],
     "argument --store-outage-s: expected a number of seconds > 0, got '0'"),
    ("loadtest.chaos", ["--broker-outage-s", "nan"],
     "argument --broker-outage-s: expected a number of seconds > 0, got 'nan'"),
    ("loadtest.chaos", ["--broker", "kafka"],
     "argument --broker: invalid choice: 'kafka' (choose from 'redis', 'rabbitmq')"),
    ("loadtest.chaos", ["--concurrency", "0"],
     "argument --concurrency: expected a whole number >= 1, got '0'"),
    ("loadtest.chaos", ["--lease-s", "-4"],
     "argument --lease-s: expected a number of seconds > 0, got '-4'"),
])
def test_fleet_and_chaos_refuse_a_bad_argument_before_starting_anything(
        tmp_path: Path, module: str, args: list[str], message: str) -> None:
    proc = subprocess.run([sys.executable, "-m", module, *args, "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr.splitlines()[-1], proc.stderr
    assert list(tmp_path.iterdir()) == []
