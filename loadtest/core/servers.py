"""The Redis and PostgreSQL servers a run uses, and the two ways it cleans up after itself.

Both URLs come from the same variables for every workload: LOADTEST_REDIS_URL (default
redis://127.0.0.1:6379/0) and LOADTEST_POSTGRES_URL (default
postgresql+psycopg://postgres@127.0.0.1:5432/test). Cleanup is by name, never wholesale:
SCAN + UNLINK of one key pattern (never FLUSHALL: other people's keys share the server), and
one SQL statement (a schema of the run's own dropped).
"""

from __future__ import annotations

import os
from contextlib import suppress
from dataclasses import dataclass, field

__all__ = ["Servers", "delete_keys", "execute_sql", "delete_queues", "psycopg_url"]

_DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
_DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
_DEFAULT_AMQP = "amqp://guest:guest@127.0.0.1:5672//"


@dataclass(frozen=True)
class Servers:
    redis_url: str = field(
        default_factory=lambda: os.environ.get("LOADTEST_REDIS_URL", _DEFAULT_REDIS))
    postgres_url: str = field(
        default_factory=lambda: os.environ.get("LOADTEST_POSTGRES_URL", _DEFAULT_POSTGRES))
    # RabbitMQ, for the chaos run's --broker rabbitmq only (shared: queues of a run's own)
    amqp_url: str = field(
        default_factory=lambda: os.environ.get("LOADTEST_AMQP_URL", _DEFAULT_AMQP))

    def check(self) -> dict[str, str | None]:
        """{"redis": None or why it is unreachable, "postgres": ...}."""
        return {"redis": _check_redis(self.redis_url),
                "postgres": _check_postgres(self.postgres_url)}

    def versions(self, status: dict[str, str | None]) -> dict[str, str | None]:
        """Each reachable server's version and durability settings, for the results."""
        out: dict[str, str | None] = {"redis": None, "postgres": None}
        if not status.get("redis"):
            with suppress(Exception):
                import redis

                client = redis.Redis.from_url(self.redis_url)
                info = client.info("server")
                persistence = client.info("persistence")
                out["redis"] = (f"{info['redis_version']} "
                                f"(aof_enabled={persistence.get('aof_enabled')})")
                client.close()
        if not status.get("postgres"):
            with suppress(Exception):
                import sqlalchemy as sa

                engine = sa.create_engine(self.postgres_url)
                with engine.connect() as conn:
                    version = conn.scalar(sa.text("show server_version"))
                    fsync = conn.scalar(sa.text("show fsync"))
                    commit = conn.scalar(sa.text("show synchronous_commit"))
                engine.dispose()
                out["postgres"] = f"{version} (fsync={fsync}, synchronous_commit={commit})"
        return out


def _check_redis(url: str) -> str | None:
    try:
        import redis

        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        client.ping()
        client.close()
    except Exception as exc:  # noqa: BLE001 - any failure means "skip what needs it"
        return f"{type(exc).__name__}: {exc}"
    return None


def _check_postgres(url: str) -> str | None:
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(url, connect_args={"connect_timeout": 2})
        with engine.connect() as conn:
            conn.execute(sa.text("select 1"))
        engine.dispose()
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    return None


def delete_keys(redis_url: str, pattern: str) -> int:
    """Delete every key matching `pattern` (SCAN + UNLINK in batches); how many went."""
    import redis

    client = redis.Redis.from_url(redis_url)
    deleted = 0
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=pattern, count=2000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += int(client.unlink(*batch))
                batch.clear()
        if batch:
            deleted += int(client.unlink(*batch))
    finally:
        client.close()
    return deleted


def psycopg_url(postgres_url: str) -> str:
    """The libpq form of a SQLAlchemy PostgreSQL URL (postgresql+psycopg://... ->
    postgresql://...), for psycopg.connect()."""
    import sqlalchemy as sa

    url = sa.engine.make_url(postgres_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


def execute_sql(postgres_url: str, sql: str, *, autocommit: bool = False) -> None:
    """One statement (or several `;`-separated, without parameters) in its own
    transaction (schema creation and removal), or none
    (`autocommit`: VACUUM cannot run inside one)."""
    import sqlalchemy as sa

    engine = sa.create_engine(postgres_url, **({"isolation_level": "AUTOCOMMIT"}
                                               if autocommit else {}))
    try:
        with engine.begin() as conn:
            conn.execute(sa.text(sql))
    finally:
        engine.dispose()


def delete_queues(amqp_url: str, names: list[str]) -> None:
    """Delete a run's own queues on RabbitMQ (never anyone else's: by exact name)."""
    from kombu import Connection  # type: ignore[attr-defined]

    with Connection(amqp_url, connect_timeout=3) as conn:  # type: ignore[no-untyped-call]
        channel = conn.channel()
        for name in names:
            with suppress(Exception):
                channel.queue_delete(name)
