"""The machine and code a run measured, stored with its figures: CPU, memory, load, package
versions, the git commit; and the machine's busy CPU time, to price a batch."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from contextlib import suppress
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["ROOT", "describe", "load_average", "library_state", "machine_busy_s"]

ROOT = Path(__file__).resolve().parents[2]  # the repository: loadtest/ and livingai_tasks/
_PACKAGES = ("livingai-tasks", "livingai", "redis", "psycopg", "SQLAlchemy", "zstandard",
             "asyncpg", "matplotlib")


def load_average() -> list[float]:
    """1, 5 and 15 minute load averages, as `uptime` prints them."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot, all CPUs (from /proc/stat):
    the difference over a batch is what the batch cost, the servers and the workers' main
    processes included."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _cpu_model() -> str | None:
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _memory_gib() -> float | None:
    with suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def _git(*args: str) -> str:
    """git's answer in the repository, or "" when git is missing or fails."""
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10).stdout.rstrip("\n")
    except (OSError, subprocess.SubprocessError):
        return ""


def library_state() -> dict[str, Any]:
    """Which livingai_tasks was measured: the commit, and its files changed since (the
    library moves while benchmarks run, so figures must say what they measured)."""
    changed = _git("status", "--porcelain", "--", "livingai_tasks")
    return {"commit": _git("rev-parse", "--short", "HEAD") or None,
            "changed_files": [line[3:] for line in changed.splitlines() if line]}


def describe() -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "packages": _versions(),
        "git": {"commit": _git("rev-parse", "HEAD") or None,
                "uncommitted_changes": bool(_git("status", "--porcelain"))},
    }
