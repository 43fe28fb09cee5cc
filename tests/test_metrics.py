"""Metrics: exact counters under threads, bounded histograms, Prometheus exposition."""

from __future__ import annotations

import ast
import gc
import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

import livingai_tasks
from livingai_tasks import CheckpointEngine, ConfigError, ExecutionNode, NodeType
from livingai_tasks.metrics import BUCKET_BOUNDS_MS, MAX_SERIES, Metrics
from livingai_tasks.metrics_catalogue import CATALOGUE, COUNTERS, declare_catalogue
from livingai_tasks.stores.memory import MemoryStore

pytestmark = pytest.mark.timeout(60)


def test_buckets_are_log_spaced_from_50us_to_a_minute() -> None:
    assert BUCKET_BOUNDS_MS[0] == 0.05
    assert BUCKET_BOUNDS_MS[-1] >= 60_000
    ratios = [b / a for a, b in zip(BUCKET_BOUNDS_MS[:-1], BUCKET_BOUNDS_MS[1:], strict=True)]
    assert all(1.2 < r < 1.32 for r in ratios)


def test_counters_and_gauges() -> None:
    m = Metrics()
    m.incr("saves")
    m.incr("saves", 4)
    m.set_gauge("depth", 7)
    m.set_gauge("depth", 3)
    assert m.counter("saves") == 5
    assert m.counter("never") == 0
    assert m.gauge("depth") == 3
    assert m.as_dict()["counters"] == {"saves": 5}
    assert m.as_dict()["gauges"] == {"depth": 3}


def test_observe_can_count_in_the_same_call() -> None:
    m = Metrics()
    m.observe("held_ms", 2.0, count=("saves", "overruns"))
    m.observe("held_ms", float("nan"), count=("saves",))  # the value is ignored, not the count
    assert m.counter("saves") == 2 and m.counter("overruns") == 1
    assert m.as_dict()["histograms"]["held_ms"]["count"] == 1


def test_a_gauge_read_from_a_function_is_read_when_the_metrics_are() -> None:
    m = Metrics()
    depth = [3]
    m.set_gauge("depth", 99)
    m.gauge_from("depth", lambda: depth[0])  # replaces the value set before
    assert m.gauge("depth") == 3
    depth[0] = 7
    assert m.gauge("depth") == 7 and m.as_dict()["gauges"] == {"depth": 7}
    assert "\nlivingai_depth 7.0" in m.prometheus_text()
    m.reset()  # values go, a live view stays
    assert m.gauge("depth") == 7


def test_a_queue_depth_gauge_follows_the_engine_and_lets_it_go() -> None:
    m = Metrics()
    engine = CheckpointEngine(MemoryStore(), metrics=m)
    engine.save(ExecutionNode(execution_id="e", type=NodeType.PROMPT), b"s", durable=True)
    assert m.gauge("checkpoint_queue_depth") == 0
    assert m.gauge("checkpoint_cache_entries") == 1
    engine.close()
    del engine
    gc.collect()  # the metrics hold the engine weakly: a shared Metrics leaks no engines
    assert m.gauge("checkpoint_cache_entries") == 0


def test_counters_are_exact_under_threads() -> None:
    m = Metrics()

    def work() -> None:
        for _ in range(20_000):
            m.incr("n")
            m.observe("t_ms", 1.0)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert m.counter("n") == 160_000
    assert m.as_dict()["histograms"]["t_ms"]["count"] == 160_000


def test_percentiles_are_within_a_bucket_of_the_truth() -> None:
    m = Metrics()
    rng = random.Random(7)
    values = sorted(rng.lognormvariate(2.0, 1.5) for _ in range(20_000))
    for v in values:
        m.observe("lat_ms", v)
    for q in (50, 95, 99):
        true = values[int(q / 100 * len(values)) - 1]
        estimate = m.percentile("lat_ms", q)
        assert estimate is not None
        assert true / 1.3 <= estimate <= true * 1.3, (q, true, estimate)
    h = m.as_dict()["histograms"]["lat_ms"]
    assert h["count"] == 20_000
    assert h["max"] == values[-1]
    assert h["sum"] == pytest.approx(sum(values))
    assert h["p50"] < h["p95"] < h["p99"] <= h["max"]


def test_percentile_is_clamped_to_what_was_observed() -> None:
    m = Metrics()
    m.observe("x_ms", 3.0)
    assert m.percentile("x_ms", 50) == 3.0
    assert m.percentile("x_ms", 0) == 3.0
    m.observe("big_ms", 500_000.0)  # beyond the last bucket
    assert m.percentile("big_ms", 99) == 500_000.0


def test_percentile_of_nothing_is_none_and_q_is_checked() -> None:
    m = Metrics()
    assert m.percentile("nothing_ms", 50) is None
    m.observe("x_ms", 1)
    with pytest.raises(ConfigError, match="0..100"):
        m.percentile("x_ms", 101)
    with pytest.raises(ConfigError, match="0..100"):
        m.percentile("x_ms", -1)


def test_memory_does_not_grow_with_observations() -> None:
    m = Metrics()
    for i in range(100_000):
        m.observe("x_ms", i % 5000)
    hist = m._histograms["x_ms"]
    assert len(hist.counts) == len(BUCKET_BOUNDS_MS) + 1
    assert hist.count == 100_000


def test_series_are_capped() -> None:
    m = Metrics()
    for i in range(MAX_SERIES + 50):
        m.incr(f"c{i}")
    counters = m.as_dict()["counters"]
    assert f"c{MAX_SERIES + 10}" not in counters
    assert counters["metrics_series_dropped"] == 50
    assert len(counters) == MAX_SERIES + 1


@pytest.mark.parametrize("name", ["", "1abc", "has space", "dash-ed", "node:3f2a"])
def test_bad_names_are_rejected(name: str) -> None:
    with pytest.raises(ConfigError, match="Metric name"):
        Metrics().incr(name)


def test_counters_only_grow_and_nan_is_ignored() -> None:
    m = Metrics()
    with pytest.raises(ConfigError, match="can only grow"):
        m.incr("x", -1)
    m.observe("y_ms", float("nan"))
    m.set_gauge("g", float("nan"))
    assert m.as_dict() == {"counters": {}, "gauges": {}, "histograms": {}}


def test_prometheus_text_has_every_series_with_prefix_and_units() -> None:
    m = Metrics()
    m.describe("saves", "Checkpoints saved.")
    m.incr("saves", 3)
    m.set_gauge("queue_depth", 5)
    for v in (0.2, 4.0, 4.0, 2500.0):
        m.observe("held_ms", v)
    m.observe("batch_ops", 12)
    text = m.prometheus_text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert set(families) == {"livingai_saves", "livingai_queue_depth",
                             "livingai_held_seconds", "livingai_batch_ops"}
    assert "# HELP livingai_saves_total Checkpoints saved." in text
    assert "livingai_saves_total 3.0" in text
    assert families["livingai_queue_depth"].samples[0].value == 5
    held = {(s.name, s.labels.get("le")): s.value
            for s in families["livingai_held_seconds"].samples}
    assert held[("livingai_held_seconds_count", None)] == 4
    assert held[("livingai_held_seconds_sum", None)] == pytest.approx(2.5082)
    assert held[("livingai_held_seconds_bucket", "0.005")] == 3  # ms became seconds
    assert held[("livingai_held_seconds_bucket", "+Inf")] == 4
    batch = {(s.name, s.labels.get("le")): s.value for s in families["livingai_batch_ops"].samples}
    assert batch[("livingai_batch_ops_bucket", "12.56")] == 1  # not converted
    assert batch[("livingai_batch_ops_bucket", "9.976")] == 0


def test_registries_are_private() -> None:
    a, b = Metrics(), Metrics()
    a.incr("only_in_a")
    assert "only_in_a" not in b.prometheus_text()


def test_reset_forgets_values() -> None:
    m = Metrics()
    m.incr("x")
    m.observe("y_ms", 1)
    m.reset()
    assert m.as_dict() == {"counters": {}, "gauges": {}, "histograms": {}}


@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_child_forked_while_the_lock_is_held_does_not_deadlock() -> None:
    m = Metrics()
    m.incr("before")
    held, release = threading.Event(), threading.Event()

    def hold() -> None:
        with m._lock:
            held.set()
            release.wait(10)

    t = threading.Thread(target=hold)
    t.start()
    held.wait(5)
    pid = os.fork()
    if pid == 0:  # child: only this thread exists; the lock must be usable
        code = 1
        try:
            m.incr("in_child")
            code = 0 if m.counter("in_child") == 1 and m.counter("before") == 1 else 2
        finally:
            os._exit(code)
    release.set()
    t.join()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child deadlocked on the metrics lock")


def test_observe_rejects_bad_names_at_once_and_counts_while_another_thread_holds_the_lock(
) -> None:
    m = Metrics()
    with pytest.raises(ConfigError, match="Metric name"):
        m.observe("bad name_ms", 1.0)
    with pytest.raises(ConfigError, match="Metric name"):
        m.observe("ok_ms", 1.0, count=["bad-counter"])
    m._lock.acquire()  # a thread preempted while it records: the others do not wait for it
    t = threading.Thread(target=lambda: (m.observe("held_ms", 3.0, count=["saves"]),
                                         m.incr("saves")))
    t.start()
    t.join(5)
    assert not t.is_alive()
    m._lock.release()
    assert m.counter("saves") == 2 and m.percentile("held_ms", 0.5) is not None


# -- the catalogue ---------------------------------------------------------------------------
PACKAGE = Path(livingai_tasks.__file__).parent
_RECORDERS = {"incr", "observe", "gauge_from", "set_gauge"}


def _emitted_in_source() -> set[str]:
    """Every series name the package's code records, read off its syntax: the first
    argument of incr/observe/gauge_from/set_gauge, `count=` of the budget and of observe(),
    the extra arguments of the budget's _held(), the keys of the engine's _GAUGES."""
    names: set[str] = set()

    def strings(node: ast.AST) -> list[str]:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return [node.value]
        if isinstance(node, (ast.Tuple, ast.List)):
            return [s for element in node.elts for s in strings(element)]
        return []

    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called in _RECORDERS and node.args:
                    names.update(strings(node.args[0]))
                if called == "_held":
                    for arg in node.args[1:]:
                        names.update(strings(arg))
                for keyword in node.keywords:
                    if keyword.arg == "count":
                        names.update(strings(keyword.value))
            elif isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "_GAUGES":
                assert isinstance(node.value, ast.Dict)
                names.update(s for key in node.value.keys if key is not None
                             for s in strings(key))
    return names


def test_every_series_the_package_records_is_catalogued() -> None:
    emitted = _emitted_in_source()
    # The scan finds the engine's series and those of the other modules.
    assert {"checkpoint_saves", "checkpoint_held_ms", "checkpoint_queue_depth",
            "signal_errors", "recovery_ticks"} <= emitted
    assert emitted - {s.name for s in CATALOGUE} == set()


def test_every_catalogued_series_is_recorded_somewhere() -> None:
    source = "".join(path.read_text() for path in PACKAGE.rglob("*.py")
                     if path.name != "metrics_catalogue.py")
    dead = [s.name for s in CATALOGUE if f'"{s.name}"' not in source]
    assert dead == []


def test_the_catalogue_names_each_series_once_with_help() -> None:
    names = [s.name for s in CATALOGUE]
    assert len(names) == len(set(names))
    assert all(s.kind in ("counter", "gauge", "histogram") and s.help.endswith(".")
               for s in CATALOGUE)


def test_declare_catalogue_describes_every_series_and_zeroes_every_counter() -> None:
    m = Metrics()
    m.incr("steps_replayed", 2)
    declare_catalogue(m)
    counters = m.as_dict()["counters"]
    assert counters == {name: (2 if name == "steps_replayed" else 0) for name in COUNTERS}
    text = m.prometheus_text()
    for series in CATALOGUE:
        if series.kind == "counter":
            assert f"# HELP {series.prometheus_name} {series.help}\n" in text, series.name


def test_an_engine_declares_the_catalogue_on_its_metrics() -> None:
    m = Metrics()
    engine = CheckpointEngine(MemoryStore(), metrics=m)
    counters = m.as_dict()["counters"]
    # Zeroed too, though other modules record them: rate() and alerts see them from the start.
    assert {"signal_errors", "steps_requeued_store_down", "steps_replayed",
            "recovery_ticks", "recovery_resumed"} <= set(counters)
    assert set(counters) == set(COUNTERS)
    engine.close()


def test_catalogued_prometheus_names_are_what_the_export_shows() -> None:
    m = Metrics()
    for series in CATALOGUE:
        if series.kind == "counter":
            m.incr(series.name)
        elif series.kind == "gauge":
            m.set_gauge(series.name, 1)
        else:
            m.observe(series.name, 1.0)
    samples = {sample.name for family in text_string_to_metric_families(m.prometheus_text())
               for sample in family.samples}
    for series in CATALOGUE:
        if series.kind == "histogram":
            assert f"{series.prometheus_name}_count" in samples, series.name
        else:
            assert series.prometheus_name in samples, series.name
    # Names dashboards and the READMEs use: they must not change.
    assert {"livingai_checkpoint_saves_total", "livingai_checkpoint_caller_encodes_total",
            "livingai_checkpoint_queue_depth", "livingai_checkpoint_held_seconds_count",
            "livingai_checkpoint_batch_ops_count", "livingai_recovery_ticks_total"} <= samples
