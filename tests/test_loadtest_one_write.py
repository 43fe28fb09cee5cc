"""The fleet benchmark's one-write variant (`python -m loadtest.fleet --one-write`), on a real
worker and Redis: the figure it stands for ("one write a step") holds only if every step
really wrote once, with its input and output; and the summary's arithmetic. Correctness
only, never timing."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from loadtest.core.servers import execute_sql, psycopg_url
from loadtest.fleet.app import (
    STEP_NAMES,
    Work,
    fx_keys,
    make_app,
    one_write_tables,
    side_effects,
)
from loadtest.fleet.processes import Fleet, Namespace
from loadtest.fleet.throughput import Batch, Config, _summarise

from .conftest import need_postgres, need_redis


def _records_by_root(client: redis.Redis, prefix: str,
                     postgres: tuple[str, str] | None) -> dict[str, list[dict[str, Any]]]:
    """What the one-write steps wrote, per canvas root, in the order written."""
    found: dict[str, list[dict[str, Any]]] = {}
    if postgres is None:
        base = fx_keys(prefix)["one_write"]
        for key in client.scan_iter(match=f"{base}:r:*"):
            root = key.decode().rsplit(":", 1)[1]
            found[root] = [json.loads(raw) for raw in client.lrange(key, 0, -1)]
            assert client.hget(f"{base}:leases", root) is not None
        return found
    url, schema = postgres
    with psycopg.connect(url, autocommit=True) as conn:
        for root, record in conn.execute(f'SELECT root, record FROM "{schema}".steps ORDER BY id'):
            found.setdefault(root, []).append(json.loads(record))
        leased = {row[0] for row in conn.execute(f'SELECT root FROM "{schema}".leases')}
    assert leased == set(found)
    return found


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sink", ["redis", "postgres"])
def test_each_step_of_each_chain_is_written_once_with_its_input_and_output(
        tmp_path: Path, sink: str) -> None:
    url = need_redis()
    ns = Namespace(f"ow{uuid.uuid4().hex[:8]}", url)
    queue = f"one-write-{ns.tag}"
    env = {**ns.env(), "LT_MODE": "one-write", "LT_QUEUE": queue}
    postgres = None
    if sink == "postgres":
        postgres = (psycopg_url(need_postgres()), f"{ns.prefix}-one-write")
        execute_sql(need_postgres(), one_write_tables(postgres[1]))
        env.update(LT_ONE_WRITE_PG=postgres[0], LT_ONE_WRITE_SCHEMA=postgres[1])
    _, steps = make_app("one-write", prefix=ns.prefix, redis_url=url, queue=queue)
    fleet = Fleet(tmp_path / "logs", env)
    client = redis.Redis.from_url(url)
    try:
        fleet.worker(f"{queue}-w1", [queue])
        fleet.wait_ready()
        runs = [steps.canvas(f"run-{i}", Work(cpu_rounds=0, state_bytes=2_000)).apply_async()
                for i in range(2)]
        finals = [run.get(timeout=60) for run in runs]
        written = _records_by_root(client, ns.prefix, postgres)
        assert len(written) == 2  # one list of records per chain, under its canvas root
        for records in written.values():
            assert [r["task"] for r in records] == [f"lt.one-write.{s}" for s in STEP_NAMES]
            assert {r["state"] for r in records} == {"SUCCESS"}
            # A step's input is what the step before it returned: nothing lost on the way.
            for before, after in zip(records, records[1:], strict=False):
                assert after["input"]["args"][0] == before["output"]
            assert records[-1]["output"] in finals
        assert side_effects(client, ns.prefix) == (2, 0)  # each chain's act ran once
        assert fleet.log_problems() == []
    finally:
        fleet.stop()
        ns.cleanup()
        client.close()
        if postgres is not None:
            execute_sql(need_postgres(), f'DROP SCHEMA "{postgres[1]}" CASCADE')


def test_the_summary_sets_one_writes_cost_beside_livingais() -> None:
    """Pure arithmetic over made-up batches: each variant's medians, and what one-write and
    livingai each add to tuned Celery's CPU (pool + main + servers)."""
    cfg = Config(chains=10, rounds=1, stores=("redis",), works=("noop",), one_write=True)
    assert cfg.variants == ("plain", "plain-tuned", "one-write", "lai")
    parts = {"plain": (1.0, 1.0, 0.2), "plain-tuned": (1.5, 1.0, 0.2),
             "one-write": (1.6, 1.0, 0.25), "lai": (2.5, 1.1, 0.5)}
    batches = [Batch("redis", "noop", variant, 1, 10, wall_s=wall, cpu_ms_per_step=3.0,
                     cpu_parts_ms={"pool": pool, "main": main, "redis": server,
                                   "postgres": 0.0, "publisher": 0.1})
               for (variant, (pool, main, server)), wall
               in zip(parts.items(), (1.0, 1.0, 1.25, 2.0), strict=True)]
    (row,) = _summarise(cfg, batches)
    assert row["one_write_ratio"] == pytest.approx(0.8)
    assert row["ratio"] == pytest.approx(0.5)
    assert row["one_write_added_cpu_ms"] == pytest.approx(0.15)
    assert row["added_cpu_ms"] == pytest.approx(1.4)
    without = Config(chains=10, rounds=1, stores=("redis",), works=("noop",))
    (plain_row,) = _summarise(without, [b for b in batches if b.variant != "one-write"])
    assert "one_write_ratio" not in plain_row and plain_row["added_cpu_ms"] == pytest.approx(1.4)
