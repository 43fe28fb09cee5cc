"""A worker's metrics summed over its processes (metrics_fleet), its /metrics endpoint
(metrics_http) and the settings that turn it on. Processes here are real subprocesses:
alive, exited, and SIGKILLed."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa
from prometheus_client.parser import text_string_to_metric_families

from livingai_tasks import ConfigError, Settings, open_store
from livingai_tasks.metrics import Metrics
from livingai_tasks.metrics_fleet import (
    SnapshotWriter,
    WorkerFolder,
    merge,
    snapshot,
    to_metrics,
    worker_folder,
)
from livingai_tasks.metrics_http import CONTENT_TYPE, MetricsServer

from .fleet import ROOT, wait_for

pytestmark = pytest.mark.timeout(60)


def _samples(text: str) -> dict[str, float]:
    return {s.name: s.value for family in text_string_to_metric_families(text)
            for s in family.samples if not s.labels}


# -- summing snapshots ------------------------------------------------------------------


def test_merge_sums_counters_gauges_and_histograms_bucket_by_bucket() -> None:
    a, b = Metrics(), Metrics()
    a.incr("checkpoint_saves", 3)
    b.incr("checkpoint_saves", 4)
    b.incr("checkpoint_dropped")
    a.set_gauge("checkpoint_queue_depth", 2)
    b.set_gauge("checkpoint_queue_depth", 5)
    for v in (0.1, 1.0, 10.0):
        a.observe("checkpoint_held_ms", v)
    b.observe("checkpoint_held_ms", 100.0)
    total = merge([snapshot(a), snapshot(b)])
    assert total["counters"] == {"checkpoint_saves": 7, "checkpoint_dropped": 1}
    assert total["gauges"] == {"checkpoint_queue_depth": 7}
    held = total["histograms"]["checkpoint_held_ms"]
    assert held["count"] == 4 and held["sum"] == pytest.approx(111.1)
    assert held["min"] == 0.1 and held["max"] == 100.0 and sum(held["counts"]) == 4
    assert merge([snapshot(a), snapshot(b)], gauges=False)["gauges"] == {}

    # Exported as one Metrics: the sum shows as Prometheus text, HELP from the catalogue.
    text = to_metrics(total).prometheus_text()
    samples = _samples(text)
    assert samples["livingai_checkpoint_saves_total"] == 7
    assert samples["livingai_checkpoint_queue_depth"] == 7
    assert samples["livingai_checkpoint_held_seconds_count"] == 4
    assert samples["livingai_checkpoint_held_seconds_sum"] == pytest.approx(0.1111)
    assert samples["livingai_checkpoint_writer_restarts_total"] == 0  # zeroed, as an engine's
    assert "# HELP livingai_checkpoint_dropped_total Writes lost" in text
    # The same percentiles as one process that had seen all four values.
    one = Metrics()
    for v in (0.1, 1.0, 10.0, 100.0):
        one.observe("checkpoint_held_ms", v)
    assert to_metrics(total).percentile("checkpoint_held_ms", 50) == \
        one.percentile("checkpoint_held_ms", 50)


def test_a_snapshot_is_json_even_with_an_empty_histogram_and_other_buckets_are_skipped() -> None:
    m = Metrics()
    m.observe("checkpoint_encode_ms", float("nan"))  # creates nothing
    m.observe("checkpoint_batch_ops", 3)
    snap = json.loads(json.dumps(snapshot(m), allow_nan=False))
    foreign = {"counters": {}, "gauges": {}, "histograms": {
        "checkpoint_batch_ops": {"counts": [1, 2], "count": 3, "sum": 1.0, "min": 1.0,
                                 "max": 1.0}}}
    total = merge([snap, foreign])
    assert total["histograms"]["checkpoint_batch_ops"]["count"] == 1


# -- one process's file, a worker's folder ------------------------------------------------

_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from livingai_tasks.metrics import Metrics
    from livingai_tasks.metrics_fleet import SnapshotWriter
    m = Metrics()
    writer = SnapshotWriter(Path(sys.argv[1]), lambda: m, interval_s=0.2)
    writer.start()
    m.incr("checkpoint_saves", int(sys.argv[2]))
    m.set_gauge("checkpoint_queue_depth", 5)
    m.observe("checkpoint_held_ms", 2.0)
    print("counted", flush=True)
    if sys.argv[3] == "exit":
        writer.stop()  # what worker_process_shutdown does
    else:
        time.sleep(60)
""")


def _process(folder: Path, saves: int, how: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(folder), str(saves), how],
                            env=env, text=True,
                            stdout=subprocess.PIPE if how == "sleep" else subprocess.DEVNULL)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.json"))


def test_the_folder_sums_live_exited_and_sigkilled_processes(tmp_path: Path) -> None:
    folder = WorkerFolder(tmp_path / "w")
    folder.prepare()
    live = _process(folder.folder, 1, "sleep")
    exited = _process(folder.folder, 10, "exit")
    killed = _process(folder.folder, 100, "sleep")
    try:
        assert exited.wait(20) == 0
        for p in (live, killed):
            assert p.stdout is not None and p.stdout.readline() == "counted\n"
        # Within one snapshot interval (0.2 s here) of counting, the count is on disk...
        wait_for(lambda: folder.read()["counters"].get("checkpoint_saves") == 111, 5,
                 "three processes' counts")
        # ...so a SIGKILL after that loses nothing.
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
        total = folder.read()
        assert total["counters"]["checkpoint_saves"] == 111
        assert total["histograms"]["checkpoint_held_ms"]["count"] == 3
        # Gauges: the live process's only (the dead held nothing any more).
        assert total["gauges"]["checkpoint_queue_depth"] == 5
        # The two dead processes' files are folded into retired.json, and read once.
        files = _files(folder.folder)
        assert len(files) == 2 and files[0].startswith(f"{live.pid}-") and \
            files[1] == "retired.json"
        assert folder.read()["counters"]["checkpoint_saves"] == 111
    finally:
        for p in (live, exited, killed):
            p.kill()
            p.wait(10)
            if p.stdout is not None:
                p.stdout.close()
    # The last one gone: its counts are kept, its gauge is not.
    total = folder.read()
    assert total["counters"]["checkpoint_saves"] == 111 and total["gauges"] == {}
    assert _files(folder.folder) == ["retired.json"]


def test_a_fold_cut_short_is_not_counted_twice_and_a_bad_file_is_skipped(
        tmp_path: Path) -> None:
    folder = WorkerFolder(tmp_path / "w")
    folder.prepare()
    p = _process(folder.folder, 4, "exit")
    assert p.wait(20) == 0
    [name] = _files(folder.folder)
    kept = (folder.folder / name).read_text()
    assert folder.read()["counters"]["checkpoint_saves"] == 4
    # As if the main process died between writing retired.json and removing the file.
    (folder.folder / name).write_text(kept)
    assert folder.read()["counters"]["checkpoint_saves"] == 4
    assert _files(folder.folder) == ["retired.json"]
    (folder.folder / "999-bad.json").write_text("{not json")
    assert folder.read()["counters"]["checkpoint_saves"] == 4
    assert _files(folder.folder) == ["retired.json"]


def test_prepare_empties_the_folder_and_removes_dead_workers_folders(tmp_path: Path) -> None:
    root = tmp_path / "root"
    mine = WorkerFolder(worker_folder(f"host:{os.getpid()}", root))
    dead = worker_folder("host:999999999", root)  # no such pid
    other_live = worker_folder(f"host:{os.getppid()}", root)
    for path in (mine.folder, dead, other_live):
        path.mkdir(parents=True)
        (path / "1-a.json").write_text("{}")
    mine.prepare()
    assert mine.folder.is_dir() and _files(mine.folder) == []
    assert not dead.exists() and other_live.exists()


def test_the_writer_writes_only_what_changed_and_names_its_file_by_pid(tmp_path: Path) -> None:
    m = Metrics()
    writer = SnapshotWriter(tmp_path, lambda: m)
    assert writer.path.name.startswith(f"{os.getpid()}-")
    writer.write_now()
    first = writer.path.stat().st_mtime_ns
    time.sleep(0.01)
    writer.write_now()  # nothing changed: no write
    assert writer.path.stat().st_mtime_ns == first
    m.incr("checkpoint_saves")
    writer.write_now()
    assert json.loads(writer.path.read_text())["counters"] == {"checkpoint_saves": 1}


# -- the endpoint -------------------------------------------------------------------------


def test_the_endpoint_serves_prometheus_text_and_404_elsewhere() -> None:
    m = Metrics()
    m.incr("checkpoint_rejected", 2)
    server = MetricsServer("127.0.0.1", 0, m.prometheus_text)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            assert r.headers["Content-Type"] == CONTENT_TYPE
            assert _samples(r.read().decode())["livingai_checkpoint_rejected_total"] == 2
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"http://127.0.0.1:{server.port}/", timeout=5)
        assert err.value.code == 404
        err.value.close()
    finally:
        server.close()


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"metrics_port {port}: cannot listen on "
                           rf"127\.0\.0\.1:{port} .*free TCP port 1\.\.65535.*0 for no"):
            MetricsServer("127.0.0.1", port, str)


# -- settings -------------------------------------------------------------------------------


def test_metrics_settings_default_off_and_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    s = Settings()
    assert (s.metrics_port, s.metrics_bind) == (0, "127.0.0.1")
    assert Settings.resolve(metrics_port=None).metrics_port == 0
    assert Settings.resolve(metrics_port=9808, metrics_bind="0.0.0.0").metrics_port == 9808
    for bad in (-1, 65536, True, 1.5):
        with pytest.raises(ConfigError, match="metrics_port"):
            Settings(metrics_port=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"metrics_bind must be an IP address.*'localhost'"):
        Settings(metrics_bind="localhost")
    monkeypatch.setenv("LIVINGAI_METRICS_PORT", "9809")
    assert Settings.resolve().metrics_port == 9809
    monkeypatch.setenv("LIVINGAI_METRICS_PORT", "nine")
    with pytest.raises(ConfigError,
                       match="LIVINGAI_METRICS_PORT must be a whole number, got 'nine'"):
        Settings.resolve()


# -- a store from before schema version 5 -------------------------------------------------


def test_migrate_adds_the_counters_column_to_an_older_workers_table(tmp_path: Path) -> None:
    store = open_store(f"sqlite:///{tmp_path}/old.db")
    store.migrate()
    engine = store._get_engine()  # type: ignore[attr-defined]
    with engine.begin() as conn:
        conn.execute(sa.text("ALTER TABLE lai_workers DROP COLUMN counters"))
        conn.execute(sa.text("DELETE FROM lai_schema_version WHERE version >= 5"))
        conn.execute(sa.text("INSERT INTO lai_workers (worker, expires_at, owners, holding, "
                             "updated_at) VALUES ('w0', 1, '[]', '[]', '2026-01-01')"))
    store.close()
    store = open_store(f"sqlite:///{tmp_path}/old.db")
    store.migrate()
    assert store.worker("w0").counters == {}  # type: ignore[attr-defined]
    store.beat_worker("w1", expires_at=1, owners=[], holding=[],  # type: ignore[attr-defined]
                      counters={"checkpoint_saves": 2})
    assert store.worker("w1").counters == {"checkpoint_saves": 2}  # type: ignore[attr-defined]
    store.close()


# -- the documented alerts ----------------------------------------------------------------


def test_the_alerts_in_workers_readme_use_only_exported_series() -> None:
    import re

    from livingai_tasks.metrics_catalogue import CATALOGUE

    readme = (ROOT / "workers" / "README.md").read_text()
    used = set(re.findall(r"\blivingai_[a-z_]+", readme)) - {"livingai_tasks"}
    exported = {s.prometheus_name for s in CATALOGUE}
    exported |= {f"{s.prometheus_name}_{x}" for s in CATALOGUE if s.kind == "histogram"
                 for x in ("bucket", "sum", "count")}
    settings = {"livingai_metrics_port"}  # the Celery config key named there
    assert used - settings <= exported, used - settings - exported
    for name in ("livingai_checkpoint_rejected_total", "livingai_checkpoint_spilled_total",
                 "livingai_checkpoint_dropped_total", "livingai_checkpoint_writer_restarts_total",
                 "livingai_recovery_resumed_total", "livingai_executions_in_doubt_total"):
        assert f"increase({name}" in readme or f"rate({name}" in readme, name


def test_a_malformed_worker_record_is_skipped_by_the_listing(tmp_path: Path,
                                                             redis_prefix: str) -> None:
    import redis

    from .conftest import REDIS_URL

    sql = open_store(f"sqlite:///{tmp_path}/w.db")
    sql.migrate()
    rds = open_store(f"{REDIS_URL}?prefix={redis_prefix}")
    try:
        for store in (sql, rds):
            for name in ("good", "bad"):
                store.beat_worker(name, expires_at=1, owners=[], holding=[],  # type: ignore[attr-defined]
                                  counters={"checkpoint_saves": 1})
        with sql._get_engine().begin() as conn:  # type: ignore[attr-defined]
            conn.execute(sa.text("UPDATE lai_workers SET counters = '{\"x\": \"many\"}' "
                                 "WHERE worker = 'bad'"))
        client = redis.Redis.from_url(REDIS_URL)
        client.hset(f"{redis_prefix}:workers", "bad", b"{truncated")
        client.close()
        for store in (sql, rds):
            assert [w.worker for w in store.workers()] == ["good"]  # type: ignore[attr-defined]
    finally:
        sql.close()
        rds.close()
