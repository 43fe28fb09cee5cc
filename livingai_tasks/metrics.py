"""In-process metrics: counters, gauges and fixed-bucket histograms, exported as a dict or
as Prometheus exposition text.

Memory is bounded whatever the traffic: a histogram is one array of bucket counts (no list
of samples), and the number of distinct series per kind is capped (`MAX_SERIES`; further
names are ignored and counted in the counter `metrics_series_dropped`).

Histograms take milliseconds. Their buckets are log-spaced, ten per decade, from 0.05 ms to
~63 s (`BUCKET_BOUNDS_MS`), plus an overflow bucket, so a percentile estimated from them is
within one bucket width (~26 %) of the truth and is clamped to the observed min/max.

Prometheus export (`prometheus_text()`): every name gets the prefix `livingai_`. Counters
follow the client's convention and end in `_total`. A histogram whose name ends in `_ms` is
exported in seconds, the Prometheus base unit: `checkpoint_held_ms` becomes
`livingai_checkpoint_held_seconds` (buckets and sum divided by 1000); any other histogram
(e.g. a batch size) is exported unchanged.

A gauge can also be a live view (`gauge_from(name, read)`), read when the metrics are read,
so a hot path (a save) never takes the metrics' lock to keep it current.

Every series the package emits is listed once, with its HELP text, in `CATALOGUE`
(metrics_catalogue.py), which also zeroes them on a Metrics (`declare_catalogue()`).

Thread-safe (one lock per instance) and fork-safe: a child process gets a fresh lock, so a
lock held by another parent thread at fork time cannot deadlock it. The values themselves
are inherited; call `reset()` in the child if it must report only its own.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import re
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from .errors import ConfigError
from .no_convoy_lock import NoConvoyLock

__all__ = ["Metrics", "BUCKET_BOUNDS_MS", "MAX_SERIES", "PREFIX"]

log = logging.getLogger("livingai_tasks.metrics")

PREFIX = "livingai_"
MAX_SERIES = 512  # per kind (counters, gauges, histograms)
# 10 buckets per decade: 0.05 ms * 10**(k/10) for k = 0..61, i.e. 0.05 ms .. 62.9 s.
BUCKET_BOUNDS_MS = tuple(float(f"{0.05 * 10 ** (k / 10):.4g}") for k in range(62))
_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")


@dataclass
class _Histogram:
    counts: list[int] = field(default_factory=lambda: [0] * (len(BUCKET_BOUNDS_MS) + 1))
    count: int = 0
    sum: float = 0.0
    min: float = math.inf
    max: float = 0.0

    def observe(self, value: float) -> None:
        # bisect_left: a value equal to a bound belongs to that bound's bucket (le semantics).
        self.counts[bisect.bisect_left(BUCKET_BOUNDS_MS, value)] += 1
        self.count += 1
        self.sum += value
        self.min = min(self.min, value)
        self.max = max(self.max, value)

    def percentile(self, q: float) -> float | None:
        if self.count == 0:
            return None
        rank = q / 100.0 * self.count
        cumulative = 0
        for i, n in enumerate(self.counts):
            if n and cumulative + n >= rank:
                lower = BUCKET_BOUNDS_MS[i - 1] if i > 0 else 0.0
                upper = BUCKET_BOUNDS_MS[i] if i < len(BUCKET_BOUNDS_MS) else self.max
                estimate = lower + (upper - lower) * max(rank - cumulative, 0.0) / n
                return min(max(estimate, self.min), self.max)
            cumulative += n
        return self.max

    def copy(self) -> _Histogram:
        return _Histogram(list(self.counts), self.count, self.sum, self.min, self.max)


_instances: weakref.WeakSet[Metrics] = weakref.WeakSet()


def _reinit_locks_in_child() -> None:
    for metrics in list(_instances):
        metrics._lock = NoConvoyLock()


os.register_at_fork(after_in_child=_reinit_locks_in_child)


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(
            f"Metric name {name!r} is invalid: use letters, digits and _ "
            "(not starting with a digit), e.g. 'checkpoint_saves'."
        )


class Metrics:
    """Thread-safe counters, gauges and millisecond histograms with bounded memory."""

    def __init__(self) -> None:
        self._lock = NoConvoyLock()
        self._counters: dict[str, float] = {}
        self._gauges: dict[str, float] = {}
        self._gauge_fns: dict[str, Callable[[], float]] = {}
        self._histograms: dict[str, _Histogram] = {}
        self._help: dict[str, str] = {}
        self._warned_full = False
        self._registry = CollectorRegistry(auto_describe=False)
        self._registry.register(_Collector(self))
        _instances.add(self)

    # -- recording ------------------------------------------------------------------------
    def incr(self, name: str, n: float = 1) -> None:
        """Add `n` (>= 0) to a counter. ConfigError for a bad name or a negative `n`."""
        if not n >= 0:  # also rejects NaN
            raise ConfigError(f"Counter {name!r} can only grow: n must be >= 0, got {n!r}.")
        if name not in self._counters:
            _check_name(name)
        # Deferred, not waited for: see observe().
        self._lock.defer(lambda: self._add(name, n))

    def _add(self, name: str, n: float) -> None:
        """Add to a counter; called with the lock held."""
        if name in self._counters:
            self._counters[name] += n
        elif self._admit(name, self._counters):
            self._counters[name] = n

    def set_gauge(self, name: str, value: float) -> None:
        """Set a gauge to `value` (any finite number; NaN is ignored)."""
        if math.isnan(value):
            return
        with self._lock:
            if name in self._gauges or self._admit(name, self._gauges):
                self._gauges[name] = float(value)

    def gauge_from(self, name: str, read: Callable[[], float]) -> None:
        """Make `name` a gauge whose value is `read()` at the moment it is read (a queue's
        length, a cache's size): the code that changes the value never touches the metrics'
        lock, which many threads contending for would queue behind. Replaces a value set
        with set_gauge(); survives reset(). `read` must be cheap and must not raise."""
        with self._lock:
            if name in self._gauge_fns or self._admit(name, self._gauge_fns):
                self._gauges.pop(name, None)
                self._gauge_fns[name] = read

    def observe(self, name: str, value_ms: float, *, count: Sequence[str] = ()) -> None:
        """Record one duration in milliseconds (or one size, for a name not ending in _ms).

        Negative values count as 0; NaN is ignored. `count`: counters to add 1 to as well,
        under the same acquisition of the lock (a hot path recording both takes it once).
        """
        for checked in (name, *count):
            if checked not in self._histograms and checked not in self._counters:
                _check_name(checked)
        # Recorded under the lock, but never waited for: with the lock held by a thread that
        # waits for the GIL, its holder records this before it lets go (NoConvoyLock.defer).
        # Every read takes the lock, so it sees every value recorded before it.
        self._lock.defer(lambda: self._observe(name, value_ms, count))

    def _observe(self, name: str, value_ms: float, count: Sequence[str]) -> None:
        for counter in count:
            self._add(counter, 1)
        if math.isnan(value_ms):
            return
        value = max(float(value_ms), 0.0)
        hist = self._histograms.get(name)
        if hist is None:
            if not self._admit(name, self._histograms):
                return
            hist = self._histograms[name] = _Histogram()
        hist.observe(value)

    def describe(self, name: str, text: str) -> None:
        """Set the HELP text Prometheus shows for `name` (optional; without it, the name
        with spaces). declare_catalogue() describes the package's own series."""
        with self._lock:
            if name in self._help or len(self._help) < 3 * MAX_SERIES:
                self._help[name] = text

    def reset(self) -> None:
        """Forget every value (HELP texts stay)."""
        with self._lock:
            self._counters.clear()
            self._gauges.clear()
            self._histograms.clear()

    def _admit(self, name: str, series: dict[str, Any]) -> bool:
        """May a new series be created? Called with the lock held."""
        _check_name(name)
        if len(series) < MAX_SERIES:
            return True
        # A caller generating names from data (ids, URLs) would grow memory without end.
        self._counters["metrics_series_dropped"] = (
            self._counters.get("metrics_series_dropped", 0) + 1
        )
        if not self._warned_full:
            self._warned_full = True
            log.warning("Metrics: more than %d series of one kind; ignoring new name %r "
                        "(are names built from data?)", MAX_SERIES, name)
        return False

    # -- reading --------------------------------------------------------------------------
    def counter(self, name: str) -> float:
        """A counter's value, 0 if it was never incremented."""
        with self._lock:
            return self._counters.get(name, 0)

    def gauge(self, name: str) -> float | None:
        with self._lock:
            read = self._gauge_fns.get(name)
            if read is None:
                return self._gauges.get(name)
        return float(read())

    def percentile(self, name: str, q: float) -> float | None:
        """Estimated q-th percentile (q in 0..100, e.g. 99) of a histogram, in its unit
        (ms); None if nothing was observed. ConfigError if q is outside 0..100."""
        if not 0 <= q <= 100:
            raise ConfigError(f"Percentile q must be in 0..100 (e.g. 99), got {q!r}.")
        with self._lock:
            hist = self._histograms.get(name)
            hist = hist.copy() if hist is not None else None
        return None if hist is None else hist.percentile(q)

    def as_dict(self) -> dict[str, dict[str, Any]]:
        """{"counters": {name: n}, "gauges": {name: v}, "histograms": {name: {count, sum,
        max, p50, p95, p99}}}: a snapshot, safe to serialize as JSON."""
        counters, gauges, hists = self._snapshot()
        return {
            "counters": counters,
            "gauges": gauges,
            "histograms": {
                name: {
                    "count": h.count,
                    "sum": h.sum,
                    "max": h.max,
                    "p50": h.percentile(50),
                    "p95": h.percentile(95),
                    "p99": h.percentile(99),
                }
                for name, h in hists.items()
            },
        }

    def prometheus_text(self) -> str:
        """Prometheus text exposition format (version 0.0.4) of every series."""
        return generate_latest(self._registry).decode("utf-8")

    def _snapshot(self) -> tuple[dict[str, float], dict[str, float], dict[str, _Histogram]]:
        with self._lock:
            counters, gauges = dict(self._counters), dict(self._gauges)
            reads = dict(self._gauge_fns)
            hists = {name: h.copy() for name, h in self._histograms.items()}
        # Outside the lock: a read may take the lock of what it reads.
        gauges.update((name, float(read())) for name, read in reads.items())
        return counters, gauges, hists

    def _help_for(self, name: str) -> str:
        with self._lock:
            return self._help.get(name, name.replace("_", " "))


class _Collector:
    """Reads a Metrics snapshot at scrape time (a prometheus-client custom collector)."""

    def __init__(self, metrics: Metrics) -> None:
        # Weak: the registry lives inside the Metrics; a strong ref would be a cycle.
        self._metrics = weakref.ref(metrics)

    def collect(self) -> Iterator[Metric]:
        metrics = self._metrics()
        if metrics is None:
            return
        counters, gauges, hists = metrics._snapshot()
        for name, value in sorted(counters.items()):
            yield CounterMetricFamily(PREFIX + name, metrics._help_for(name), value=value)
        for name, value in sorted(gauges.items()):
            yield GaugeMetricFamily(PREFIX + name, metrics._help_for(name), value=value)
        for name, hist in sorted(hists.items()):
            scale, exported = 1.0, name
            if name.endswith("_ms"):
                scale, exported = 1000.0, name[: -len("_ms")] + "_seconds"
            buckets: list[tuple[str, float]] = []
            cumulative = 0
            for bound, n in zip(BUCKET_BOUNDS_MS, hist.counts[:-1], strict=True):
                cumulative += n
                buckets.append((f"{bound / scale:.6g}", cumulative))
            buckets.append(("+Inf", hist.count))
            yield HistogramMetricFamily(
                PREFIX + exported,
                metrics._help_for(name),
                buckets=buckets,
                sum_value=hist.sum / scale,
            )
