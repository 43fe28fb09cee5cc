"""A dependency-free progress bar, safe to advance from many threads.

On a terminal it redraws one line in place (at most 10 times a second, so 150 agent threads
advancing it do not turn the benchmark into a benchmark of the terminal). Elsewhere (CI
logs, pipes) it prints one line when a task starts and one when it ends.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import TextIO

__all__ = ["Progress", "Task"]

_WIDTH = 28
_REDRAW_S = 0.1


class Task:
    """One bar: `advance()` as work completes, `close()` (or use `with`) at the end."""

    def __init__(self, owner: Progress, label: str, total: int) -> None:
        self._owner = owner
        self.label = label
        self.total = max(total, 1)
        self.done = 0
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._drawn_at = 0.0
        self._closed = False
        owner._start(self)

    def advance(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._drawn_at < _REDRAW_S and self.done < self.total:
                return
            self._drawn_at = now
        self._owner._draw(self)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._owner._finish(self)

    def __enter__(self) -> Task:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def line(self) -> str:
        share = min(self.done / self.total, 1.0)
        filled = int(share * _WIDTH)
        bar = "#" * filled + "." * (_WIDTH - filled)
        elapsed = time.monotonic() - self.started
        return f"[{bar}] {share:4.0%} {self.label} {self.done}/{self.total} {elapsed:5.1f}s"


class Progress:
    """Draws Tasks on `stream` (stderr by default) and prints messages between them."""

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self._lock = threading.Lock()
        self._current: Task | None = None

    def task(self, label: str, total: int) -> Task:
        return Task(self, label, total)

    def message(self, text: str) -> None:
        """Print a line of text, with the time, without tearing a bar being drawn."""
        with self._lock:
            if self.tty and self._current is not None:
                self.stream.write("\r\033[K")
            self.stream.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
            if self.tty and self._current is not None:
                self.stream.write(self._current.line())
            self.stream.flush()

    def _start(self, task: Task) -> None:
        with self._lock:
            self._current = task
            if not self.enabled:
                return
            self.stream.write(task.line() if self.tty else f"... {task.label} ({task.total})\n")
            self.stream.flush()

    def _draw(self, task: Task) -> None:
        if not self.tty:
            return
        with self._lock:
            self.stream.write("\r\033[K" + task.line())
            self.stream.flush()

    def _finish(self, task: Task) -> None:
        with self._lock:
            if self._current is task:
                self._current = None
            if not self.enabled:
                return
            if self.tty:
                self.stream.write("\r\033[K" + task.line() + "\n")
            else:
                elapsed = time.monotonic() - task.started
                self.stream.write(f"    {task.label}: {task.done}/{task.total} in {elapsed:.1f}s\n")
            self.stream.flush()
