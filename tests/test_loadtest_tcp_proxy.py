"""The chaos run's TCP proxy (loadtest/core/tcp_proxy.py) in front of the real Redis and
PostgreSQL: traffic passes, a cut is a real outage for the client, and a restore on the same
port lets it reconnect."""

from __future__ import annotations

import pytest
import redis
import sqlalchemy as sa

from loadtest.core.tcp_proxy import TcpProxy, target_of

from .conftest import need_postgres, need_redis


def test_a_cut_is_an_outage_for_a_redis_client_and_a_restore_ends_it() -> None:
    url = need_redis()
    proxy = TcpProxy(*target_of(url)).start()
    try:
        routed = proxy.route(url)
        assert routed != url and f":{proxy.port}/" in routed
        client = redis.Redis.from_url(routed, socket_connect_timeout=1, socket_timeout=1)
        assert client.ping() is True
        assert proxy.open_connections() == 1
        assert proxy.cut() == 1
        with pytest.raises(redis.ConnectionError):
            client.ping()  # the open connection was reset, and the reconnect is refused
        proxy.restore()
        assert client.ping() is True  # same port: the client's pool reconnects by itself
        client.close()
    finally:
        proxy.close()


def test_postgres_through_the_proxy_fails_while_cut() -> None:
    url = need_postgres()
    proxy = TcpProxy(*target_of(url)).start()
    engine = sa.create_engine(proxy.route(url), connect_args={"connect_timeout": 2},
                              pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            assert conn.scalar(sa.text("select 1")) == 1
        proxy.cut()
        with pytest.raises(sa.exc.OperationalError), engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        proxy.restore()
        with engine.connect() as conn:
            assert conn.scalar(sa.text("select 1")) == 1
    finally:
        engine.dispose()
        proxy.close()


def test_connections_past_the_cap_are_closed() -> None:
    url = need_redis()
    proxy = TcpProxy(*target_of(url), max_connections=1).start()
    try:
        first = redis.Redis.from_url(proxy.route(url), socket_timeout=1)
        second = redis.Redis.from_url(proxy.route(url), socket_timeout=1)
        assert first.ping() is True
        with pytest.raises(redis.ConnectionError):
            second.ping()
        assert proxy.refused_over_cap >= 1
        first.close()
        second.close()
    finally:
        proxy.close()


@pytest.mark.parametrize(("url", "message"), [
    ("redis://10.1.2.3:6379/0", "loopback addresses only"),
    ("redis:///tmp/redis.sock", "cannot tell host and port"),
])
def test_only_a_loopback_target_with_a_port_is_accepted(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TcpProxy(*target_of(url))


def test_target_of_knows_each_schemes_default_port() -> None:
    assert target_of("postgresql+psycopg://postgres@127.0.0.1/test") == ("127.0.0.1", 5432)
    assert target_of("redis://localhost/0") == ("localhost", 6379)
    assert target_of("amqp://guest:guest@127.0.0.1//") == ("127.0.0.1", 5672)
