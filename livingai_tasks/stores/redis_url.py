"""The Redis store's URL: what redis-py connects to, and the store's own parameters."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from ..errors import ConfigError
from ._common import mask_url

__all__ = ["RedisURL", "parse_redis_url", "ACCEPTED_PARAMS"]

ACCEPTED_PARAMS = (
    "prefix=<name> ([A-Za-z0-9_.-]+, default 'lai'), socket_timeout=<seconds> (default 3)"
)
_PREFIX = re.compile(r"[A-Za-z0-9_.\-]+")


@dataclass(frozen=True)
class RedisURL:
    """A parsed store URL: what redis-py connects to, and our own parameters."""

    connect_url: str  # scheme, credentials, host, port, db: our parameters removed
    prefix: str
    socket_timeout: float


def parse_redis_url(url: str) -> RedisURL:
    """Check a redis:// or rediss:// store URL; ConfigError says what is accepted."""
    parts = urlsplit(url)
    shown = mask_url(urlunsplit((parts.scheme, parts.netloc, parts.path, "", "")))
    if parts.scheme not in ("redis", "rediss"):
        raise ConfigError(f"Redis store URL must start with redis:// or rediss://, got {shown!r}.")
    try:
        parts.port  # noqa: B018 - urllib validates the port lazily, on access
    except ValueError as exc:
        raise ConfigError(f"Redis store URL {shown!r} has an invalid port: {exc}.") from exc
    if not re.fullmatch(r"/?|/\d+", parts.path) or parts.fragment:
        raise ConfigError(f"Redis store URL {shown!r}: the path must be a database number "
                          "like /0, with no #fragment.")
    params: dict[str, str] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        # The value is not echoed: a misplaced ?password=... must not end up in a log.
        if key not in ("prefix", "socket_timeout"):
            raise ConfigError(f"Unknown parameter {key!r} in Redis store URL {shown!r}. "
                              f"Accepted: {ACCEPTED_PARAMS}.")
        if key in params:
            raise ConfigError(f"Parameter {key!r} is given twice in Redis store URL {shown!r}.")
        params[key] = value
    prefix = params.get("prefix", "lai")
    if not _PREFIX.fullmatch(prefix):
        # No ':' so that one prefix can never be the start of another's keys.
        raise ConfigError(f"Redis key prefix must match [A-Za-z0-9_.-]+, got {prefix!r}.")
    raw_timeout = params.get("socket_timeout", "3")
    try:
        timeout = float(raw_timeout)
    except ValueError:
        timeout = math.nan
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigError(f"socket_timeout must be a number of seconds > 0, got {raw_timeout!r}.")
    connect = urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))
    return RedisURL(connect_url=connect, prefix=prefix, socket_timeout=timeout)
