"""CPU time of the machine's processes, part by part, from /proc: what a batch cost the
workers, each server and the publisher, read before and after it.

A process's utime + stime covers all its threads (a writer thread is its process's). A
process that starts during the batch (a PostgreSQL backend, a pool child) counts from zero;
one that exits during it loses what it had spent, so keep batches free of restarts.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from contextlib import suppress
from pathlib import Path

__all__ = ["cpu_seconds", "thread_seconds", "pids_named", "PartsClock"]

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of `pid` in seconds (all its threads); None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # fields 14 and 15 of proc(5)


def thread_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of `pid`'s threads by kind: "main user", "main sys" (its main thread's
    utime and stime), "threads user", "threads sys" (every other thread's); empty if gone."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with suppress(OSError, ValueError):
            text = (task / "stat").read_text()
            fields = text[text.rindex(")") + 2:].split()
            kind = "main" if task.name == str(pid) else "threads"
            for i, mode in ((11, "user"), (12, "sys")):
                key = f"{kind} {mode}"
                out[key] = out.get(key, 0.0) + int(fields[i]) / _TICK
    return out


def pids_named(*names: str) -> list[int]:
    """Every process whose command name (/proc/PID/comm) is one of `names`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with suppress(OSError):
                if (entry / "comm").read_text().strip() in names:
                    found.append(int(entry.name))
    return found


class PartsClock:
    """CPU seconds per part of the machine between start() and stop(). Each part is a
    function returning its pids now (read at both ends: the union counts)."""

    def __init__(self, parts: dict[str, Callable[[], Iterable[int]]]) -> None:
        self._parts = parts
        self._before: dict[str, dict[int, float]] = {}

    def _read(self) -> dict[str, dict[int, float]]:
        out: dict[str, dict[int, float]] = {}
        for name, pids in self._parts.items():
            seen = {}
            for pid in set(pids()):
                spent = cpu_seconds(pid)
                if spent is not None:
                    seen[pid] = spent
            out[name] = seen
        return out

    def start(self) -> None:
        self._before = self._read()

    def stop(self) -> dict[str, float]:
        """CPU seconds each part spent since start()."""
        after = self._read()
        return {name: sum(max(spent - self._before.get(name, {}).get(pid, 0.0), 0.0)
                          for pid, spent in seen.items())
                for name, seen in after.items()}
