"""Shared fixtures: real services, isolated per test, skipped locally, required in CI."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, NoReturn
from urllib.parse import quote

import pytest

REDIS_URL = os.environ.get("LIVINGAI_TEST_REDIS", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("LIVINGAI_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
AMQP_URL = os.environ.get("LIVINGAI_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672//")

STORE_KINDS = ["memory", "sqlite", "redis", "postgres", "tiered"]


def race(target: Callable[..., None], each: list[tuple[Any, ...]],
         warm_up_s: float = 1.0) -> list[Any]:
    """One spawned process per args tuple, all released at once after `warm_up_s` (time to
    connect): each runs target(*args, start_event, results_queue) and puts one result."""
    ctx = mp.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, start, results)) for args in each]
    for p in procs:
        p.start()
    time.sleep(warm_up_s)
    start.set()
    outcomes = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    return outcomes


def require_or_skip(service: str, exc: BaseException | str) -> NoReturn:
    if os.environ.get("LIVINGAI_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{service} is required (LIVINGAI_REQUIRE_SERVICES=1) but unreachable: {exc}",
                    pytrace=False)
    pytest.skip(f"{service} unreachable ({exc}); start it as the README says")


def _port_open(host: str, port: int) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return None
    except OSError as exc:
        return str(exc)


def need_redis() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except Exception as exc:  # noqa: BLE001 - any failure means "unreachable" here
        require_or_skip("Redis at " + REDIS_URL, exc)
    return REDIS_URL


def need_postgres() -> str:
    import sqlalchemy as sa

    try:
        engine = sa.create_engine(POSTGRES_URL, connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001
        require_or_skip("PostgreSQL at 127.0.0.1:5432", exc)
    return POSTGRES_URL


def need_rabbitmq() -> str:
    err = _port_open("127.0.0.1", 5672)
    if err:
        require_or_skip("RabbitMQ at 127.0.0.1:5672", err)
    return AMQP_URL


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards (never FLUSHALL)."""
    import redis

    need_redis()
    prefix = f"laitest-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A PostgreSQL schema of this test's own, dropped afterwards."""
    import sqlalchemy as sa

    need_postgres()
    schema = f"laitest_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    yield schema
    with engine.begin() as conn:
        conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
    engine.dispose()


def pg_url(schema: str) -> str:
    return f"{POSTGRES_URL}?schema={schema}"


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: object) -> str:
    """A URL for an empty, isolated store of the kind the test is parametrised with."""
    kind = request.param
    if kind == "memory":
        return "memory://"
    if kind == "sqlite":
        return f"sqlite:///{tmp_path}/store.db"  # tmp_path is absolute: sqlite:////tmp/...
    if kind == "redis":
        prefix = request.getfixturevalue("redis_prefix")
        return f"{REDIS_URL}?prefix={prefix}"
    if kind == "postgres":
        return pg_url(request.getfixturevalue("pg_schema"))
    if kind == "tiered":
        prefix = request.getfixturevalue("redis_prefix")
        durable = quote(pg_url(request.getfixturevalue("pg_schema")), safe="")
        return f"tiered+{REDIS_URL}?prefix={prefix}&durable={durable}"
    raise AssertionError(kind)


@pytest.fixture
def store(store_url: str) -> Iterator[object]:
    from livingai_tasks import open_store

    s = open_store(store_url)
    s.migrate()
    yield s
    s.close()


@pytest.fixture
def fleet(tmp_path: object, redis_prefix: str) -> Iterator[object]:
    """Real worker processes for one test (start them with fleet.worker(...)), on a Redis
    broker, with a Redis store under this test's prefix."""
    from livingai_tasks.celery_wing import runtime

    from .fleet import make_fleet

    f = make_fleet(tmp_path, f"{REDIS_URL}?prefix={redis_prefix}")  # type: ignore[arg-type]
    yield f
    f.close()
    runtime.get().close()

