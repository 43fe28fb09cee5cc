"""Parsing and checking of the SQL store's URLs (SQLite and PostgreSQL), once, at build time.

Every refusal is a ConfigError that says what is accepted, and none echoes a password or a
query value (either may be a secret).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.engine import URL

from ..errors import ConfigError
from ._common import mask_url

__all__ = ["SQLTarget", "parse_sql_url", "ACCEPTED_URLS", "DEFAULT_CONNECT_TIMEOUT_S"]

DEFAULT_CONNECT_TIMEOUT_S = 3.0

ACCEPTED_URLS = (
    "sqlite:///relative/path.db, sqlite:////abs/path.db, "
    "postgresql+psycopg://user[:password]@host:port/db (also postgresql:// or postgres://) "
    "with optional ?schema=NAME&connect_timeout=SECONDS"
)
# libpq settings passed through as they are, for deployments that need TLS or a name in
# pg_stat_activity; anything else in the query string is a typo until proven otherwise.
_PG_PASSTHROUGH = frozenset({"sslmode", "sslrootcert", "sslcert", "sslkey", "application_name"})
_PG_PARAMS = frozenset({"schema", "connect_timeout"}) | _PG_PASSTHROUGH
# Lower case only: the schema reaches PostgreSQL twice, quoted in CREATE SCHEMA and unquoted
# in search_path, which folds it to lower case. 'Agents' would create "Agents" and then look
# for agents, and migrate() would fail with "no schema has been selected".
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
ACCEPTED_SCHEMA = ("lower-case letters, digits and _, not starting with a digit or 'pg_' "
                   "(reserved by PostgreSQL), at most 63 characters, e.g. schema=livingai")


@dataclass(frozen=True)
class SQLTarget:
    """What create_engine needs, parsed and checked once, when the store is built."""

    dialect: str  # "sqlite" or "postgresql"
    url: URL  # without our own query parameters
    schema: str | None = None
    connect_args: dict[str, Any] = field(default_factory=dict)
    # Password spellings to scrub from driver messages; kept out of repr() like the password.
    secrets: tuple[str, ...] = field(default=(), repr=False)


def parse_sql_url(url: str) -> SQLTarget:
    """Check a sqlite:// or postgresql:// store URL; ConfigError says what is accepted."""
    shown = mask_url(url).split("?", 1)[0]  # query values may be anything: never echo them
    try:
        parsed = sa.make_url(url)
    except (exc.ArgumentError, ValueError):
        # Neither the parser's message nor its traceback: both may hold the raw password.
        raise ConfigError(
            f"Cannot parse store URL {shown!r}. Accepted: {ACCEPTED_URLS}."
        ) from None
    query = dict(parsed.query)
    driver = parsed.drivername.lower()
    if driver in ("sqlite", "sqlite+pysqlite"):
        return _parse_sqlite(parsed, query, shown)
    if driver in ("postgresql", "postgres", "postgresql+psycopg"):
        return _parse_postgres(parsed, query, shown)
    raise ConfigError(f"SQLStore cannot open {shown!r}: unsupported driver {driver!r}. "
                      f"Accepted: {ACCEPTED_URLS}.")


def check_schema_name(schema: str, shown: str) -> str:
    """The schema name if PostgreSQL will use it exactly as written; else ConfigError."""
    if not _SCHEMA_NAME.fullmatch(schema) or schema.startswith("pg_"):
        raise ConfigError(f"schema={schema!r} in {shown!r} cannot be used as it is. Accepted: "
                          f"{ACCEPTED_SCHEMA}.")
    return schema


def _check_query(query: dict[str, Any], accepted: frozenset[str], shown: str) -> None:
    unknown = sorted(set(query) - accepted)
    if unknown:
        raise ConfigError(f"Store URL {shown!r} has unknown query parameter(s) {unknown}. "
                          f"Accepted: {sorted(accepted)} (schema and the ssl* ones are "
                          "PostgreSQL only).")
    for name, value in query.items():
        if not isinstance(value, str):
            raise ConfigError(f"Store URL {shown!r} repeats the query parameter {name!r}. "
                              f"Accepted: each of {sorted(accepted)} at most once.")


def _connect_timeout(query: dict[str, Any], shown: str) -> float:
    raw = query.pop("connect_timeout", None)
    try:
        timeout = DEFAULT_CONNECT_TIMEOUT_S if raw is None else float(raw)
    except ValueError:
        timeout = math.nan
    if not (timeout > 0 and math.isfinite(timeout)):
        raise ConfigError(f"connect_timeout={raw!r} in {shown!r} is not a number of seconds > 0. "
                          "Accepted: e.g. connect_timeout=3 (the default).")
    return timeout


def _parse_sqlite(parsed: URL, query: dict[str, Any], shown: str) -> SQLTarget:
    # connect_timeout is accepted so one URL template serves both dialects; opening a local
    # file has nothing to time out (lock waits are bounded by the busy timeout).
    _check_query(query, frozenset({"connect_timeout"}), shown)
    _connect_timeout(query, shown)
    if parsed.host or parsed.username or parsed.password:
        raise ConfigError(f"SQLite URL {shown!r} names a host or credentials; a SQLite store "
                          "is a local file. "
                          "Accepted: sqlite:///relative/path.db or sqlite:////abs/path.db.")
    path = parsed.database or ""
    if not path or path == ":memory:" or path.startswith("file:"):
        raise ConfigError(f"SQLite URL {shown!r} needs a file path (an in-memory database is "
                          "neither durable nor shared between processes; use memory:// for "
                          "that). Accepted: sqlite:///relative/path.db or sqlite:////abs/path.db.")
    return SQLTarget("sqlite", sa.URL.create("sqlite+pysqlite", database=path))


def _parse_postgres(parsed: URL, query: dict[str, Any], shown: str) -> SQLTarget:
    _check_query(query, _PG_PARAMS, shown)
    schema = query.pop("schema", None)
    if schema is not None:
        check_schema_name(schema, shown)
    # libpq takes whole seconds; round up so a short timeout never becomes "wait forever" (0).
    timeout_s = math.ceil(_connect_timeout(query, shown))
    # Keepalives and a TCP user timeout end a connection whose peer vanished (a partition, a
    # dead host) in seconds instead of the kernel's ~15 minutes: the engine's writer then
    # retries on a fresh connection. A server that accepts bytes but never answers still
    # blocks until it does (libpq has no read timeout); the engine's budget shields agents.
    connect_args: dict[str, Any] = {"connect_timeout": timeout_s, "keepalives": 1,
                                    "keepalives_idle": 5, "keepalives_interval": 2,
                                    "keepalives_count": 3, "tcp_user_timeout": 10_000, **query}
    if schema is not None:
        connect_args["options"] = f"-csearch_path={schema}"
    password = parsed.password
    secrets = () if not password else (str(password), quote(str(password), safe=""))
    engine_url = parsed.set(drivername="postgresql+psycopg", query={})
    return SQLTarget("postgresql", engine_url, schema, connect_args, secrets)
