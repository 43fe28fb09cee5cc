"""The benchmarks' shared core: an isolated store leaves nothing behind on the real servers,
and the percentile and table helpers every workload reports with."""

from __future__ import annotations

import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import redis
import sqlalchemy as sa

import livingai_tasks as lai
from loadtest.core.lazy_app import lazy_app
from loadtest.core.servers import Servers
from loadtest.core.stats import median, percentile
from loadtest.core.stores import STORE_KINDS, isolated
from loadtest.core.tables import aligned, table

from .conftest import need_postgres, need_redis


def _schemas(url: str) -> set[str]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return set(conn.scalars(sa.text("select schema_name from information_schema.schemata")))
    finally:
        engine.dispose()


@pytest.mark.parametrize("kind", STORE_KINDS)
def test_an_isolated_store_is_empty_then_leaves_nothing_behind(tmp_path: Path,
                                                               kind: str) -> None:
    uses_redis, uses_postgres = kind in ("redis", "tiered"), kind in ("postgres", "tiered")
    servers = Servers(redis_url=need_redis() if uses_redis else "redis://unused",
                      postgres_url=need_postgres() if uses_postgres else "postgresql://unused")
    name = f"lt-test-{uuid.uuid4().hex[:8]}"
    # A key that starts with the name but is not under `name:` belongs to someone else.
    neighbour = f"{name}x:kept"
    client = redis.Redis.from_url(servers.redis_url) if uses_redis else None
    if client is not None:
        client.set(neighbour, b"1")
    try:
        with isolated(servers, kind, name, tmp_path) as site:
            store = lai.open_store(site.url)
            try:
                store.migrate()
                assert store.get_execution("e1") is None
                store.create_execution(lai.Execution(id="e1"))
                assert store.get_execution("e1") is not None
            finally:
                store.close()
            if uses_postgres:
                assert site.schema in _schemas(servers.postgres_url)
        if client is not None:
            assert list(client.scan_iter(match=f"{name}:*")) == []
            assert client.get(neighbour) == b"1"
        if uses_postgres:
            assert site.schema not in _schemas(servers.postgres_url)
        assert not (tmp_path / "stores").exists()  # the SQLite files and their folder
    finally:
        if client is not None:
            client.delete(neighbour)
            client.close()


def test_an_unknown_store_kind_is_refused_with_the_kinds_accepted(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="one of sqlite, redis, postgres, tiered, got 'mysql'"), \
            isolated(Servers(), "mysql", "lt-test", tmp_path):
        pass


def test_percentiles_interpolate_or_pick_a_measured_sample() -> None:
    samples = [float(x) for x in range(1, 11)]  # 1..10
    assert percentile(samples, 50) == pytest.approx(5.5)
    assert percentile(samples, 99) == pytest.approx(9.91)
    assert percentile(samples, 50, nearest_rank=True) == 5.0
    assert percentile(samples, 99, nearest_rank=True) == 10.0  # few samples: the slowest
    assert median([3.0, 1.0, 2.0, 10.0]) == pytest.approx(2.5)
    assert percentile([], 50) is None and median([]) is None


def test_tables_align_columns_and_let_notes_run_on() -> None:
    lines = aligned([["row", "engine", "p50", "p99"], ["redis", "ours", "0.05", "1.20"],
                     ["", "livingai", "(not run: no such store)"],
                     ["", "ratio", "12.5", "130"]], left=2)
    assert lines == ["row    engine     p50   p99",
                     "redis  ours      0.05  1.20",
                     "       livingai  (not run: no such store)",
                     "       ratio     12.5   130"]
    assert table([{"store": "redis", "ratio": 0.8812}, {"store": "sqlite"}],
                 ["store", "ratio"]).splitlines() == ["store   ratio",
                                                      "------  -----",
                                                      "redis   0.881",
                                                      "sqlite  -    "]


def test_a_workers_app_is_built_once_when_first_asked_for() -> None:
    built: list[object] = []

    def build() -> object:
        built.append(object())
        return built[-1]

    getattr_hook = lazy_app("loadtest.some.app", build)
    assert built == []  # nothing built until `app` is asked for
    first = getattr_hook("app")
    assert getattr_hook("app") is first and built == [first]
    with pytest.raises(AttributeError, match="module 'loadtest.some.app' has no attribute 'x'"):
        getattr_hook("x")


def test_the_record_path_benchmark_runs_on_both_paths_and_leaves_no_key_behind() -> None:
    need_redis()
    client = redis.Redis.from_url(Servers().redis_url)
    before = set(client.scan_iter(match="lt-rp-*"))
    done = subprocess.run([sys.executable, "-m", "loadtest.fleet.record_path", "--steps", "20",
                           "--rounds", "2", "--stores", "redis,sqlite"], capture_output=True,
                          text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    for kind in ("redis", "sqlite"):  # append-if-new, and the entry read with queued writes
        assert f"record path, {kind}, 20 steps x 2 rounds" in done.stdout, done.stdout
    assert "CPU per step" in done.stdout
    assert set(client.scan_iter(match="lt-rp-*")) == before


def test_the_record_path_benchmark_reports_what_the_store_kept_of_each_step() -> None:
    """--apart: each step's start lands before its outcome, which takes its place (one
    version per step); PostgreSQL is measured again after VACUUM FULL."""
    need_redis()
    need_postgres()
    done = subprocess.run([sys.executable, "-m", "loadtest.fleet.record_path", "--steps", "10",
                           "--rounds", "1", "--stores", "redis,postgres", "--apart"],
                          capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr
    assert "redis: 1.00 versions and " in done.stdout, done.stdout
    assert "postgres: 1.00 versions and " in done.stdout and "after VACUUM FULL)" in done.stdout


def test_the_record_path_benchmark_refuses_an_unknown_store() -> None:
    done = subprocess.run([sys.executable, "-m", "loadtest.fleet.record_path", "--stores",
                           "redis,mongo"], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 2 and "--stores takes sqlite, redis, postgres, tiered" in done.stderr
