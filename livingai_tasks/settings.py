"""Settings: install() keywords, then the Celery app's config, then the environment, then defaults.

    Celery config key           environment variable           default
    livingai_store              LIVINGAI_STORE                 sqlite:///livingai.db
    livingai_budget_ms          LIVINGAI_BUDGET_MS             50
    livingai_durable_wait_ms    LIVINGAI_DURABLE_WAIT_MS       2  (<= budget_ms)
    livingai_lease_s            LIVINGAI_LEASE_S               15
    livingai_heartbeat_s        LIVINGAI_HEARTBEAT_S           lease_s / 3
    livingai_recovery_interval_s LIVINGAI_RECOVERY_INTERVAL_S  2
    livingai_worker_beat_s      LIVINGAI_WORKER_BEAT_S         2
    livingai_worker_ttl_s       LIVINGAI_WORKER_TTL_S          6   (> worker_beat_s)
    livingai_max_attempts       LIVINGAI_MAX_ATTEMPTS          3   (per step)
    livingai_max_recoveries     LIVINGAI_MAX_RECOVERIES        10  (per execution)
    livingai_stuck_after_s      LIVINGAI_STUCK_AFTER_S         60
    livingai_store_wait_s       LIVINGAI_STORE_WAIT_S          10
    livingai_recovery_page      LIVINGAI_RECOVERY_PAGE         100
    livingai_recovery_queue     LIVINGAI_RECOVERY_QUEUE        "" (Celery's default queue)
    livingai_max_state_bytes    LIVINGAI_MAX_STATE_BYTES       64 MiB
    livingai_queue_max          LIVINGAI_QUEUE_MAX             10000
    livingai_queue_full         LIVINGAI_QUEUE_FULL            spill   (spill | drop)
    livingai_spill_dir          LIVINGAI_SPILL_DIR             <tempdir>/livingai-spill-<uid>
    livingai_unencoded_max_bytes LIVINGAI_UNENCODED_MAX_BYTES  256 MiB
    livingai_codec              LIVINGAI_CODEC                 zstd    (zstd | zlib | none)
    livingai_metrics_port       LIVINGAI_METRICS_PORT          0 (off; else 1..65535)
    livingai_metrics_bind       LIVINGAI_METRICS_BIND          127.0.0.1

Every value is checked here, so a bad one fails at install() in the process that called it,
not later inside a worker. The defaults live here only: CheckpointEngine's keywords default
to these fields, and it checks its arguments with the same functions (`check_*` below), so
an engine and a Settings refuse the same values with the same messages.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .codec import Codec
from .errors import ConfigError, LivingAIError
from .stores import ACCEPTED_SCHEMES, mask_url, open_store

__all__ = [
    "Settings", "DEFAULT_STORE", "check_number", "check_durable_wait", "check_queue_full",
    "check_spill_dir", "default_spill_dir", "parse_codec", "check_metrics_port",
    "check_metrics_bind",
]

DEFAULT_STORE = "sqlite:///livingai.db"
_QUEUE_FULL = ("spill", "drop")


def default_spill_dir() -> str:
    """<tempdir>/livingai-spill-<uid>: writable without setup wherever the worker runs, and
    one per user, so that workers of two users on one host neither share nor lock each
    other out of a folder. The temp dir may be wiped at reboot or be RAM (tmpfs): a spill
    is meant to outlive a store outage and a worker restart, not the host; on a container
    whose /tmp dies with it, point LIVINGAI_SPILL_DIR at a volume."""
    uid = os.getuid() if hasattr(os, "getuid") else 0
    return os.path.join(tempfile.gettempdir(), f"livingai-spill-{uid}")


@dataclass(frozen=True)
class Settings:
    store: str = DEFAULT_STORE
    budget_ms: float = 50.0
    durable_wait_ms: float = 2.0
    lease_s: float = 15.0
    heartbeat_s: float = 0.0  # 0: lease_s / 3
    # Two seconds between ticks and a worker presumed dead 6 s after its last beat: a whole
    # worker killed is resumed within about 10 s (loadtest/README.md, chaos), for one
    # liveness write per worker every worker_beat_s and one tick per recovery_interval_s.
    recovery_interval_s: float = 2.0
    worker_beat_s: float = 2.0
    worker_ttl_s: float = 6.0
    # Two caps: a step that crashes max_attempts times is poison and fails its execution;
    # an execution recovered max_recoveries times in all (crashes spread over different
    # steps, or continuations lost again and again) fails too, so nothing loops forever.
    max_attempts: int = 3
    max_recoveries: int = 10
    stuck_after_s: float = 60.0
    # How long a starting step waits for an unreachable store before its message goes back
    # to the broker (to run later, recorded) rather than running unrecorded.
    store_wait_s: float = 10.0
    recovery_page: int = 100
    # Give recovery ticks their own queue (and a small worker for it) so they never wait
    # behind agent steps on busy workers: that wait adds straight to time-to-resume.
    recovery_queue: str = ""
    max_state_bytes: int = 64 * 2**20
    queue_max: int = 10_000
    # What the write-behind queue does with a write once queue_max wait in memory: "spill"
    # it to a file in spill_dir (drained in order when the store answers; nothing lost, the
    # agent not held), or "drop" it (counted in checkpoint_dropped; no disk used).
    queue_full: str = "spill"
    # Where spilled writes wait (created on demand, mode 0700), one folder per store URL;
    # see default_spill_dir() for the default. Give each host its own: a spill file is
    # claimed by the next engine on the same host that opens the same store.
    spill_dir: str = default_spill_dir()
    # Raw states waiting for the writer to compress them, per process. Past it a save
    # compresses its own state: memory stays bounded, and under a burst the agent is held
    # longer than the budget. Raise it to keep bursts within budget at the cost of memory.
    unencoded_max_bytes: int = 256 * 2**20
    codec: str = "zstd"
    # The worker's main process serves its processes' summed metrics as Prometheus text at
    # http://<metrics_bind>:<metrics_port>/metrics (metrics_fleet.py); 0: no endpoint (the
    # counters still reach `livingai-tasks stats` through the worker's liveness record).
    metrics_port: int = 0
    metrics_bind: str = "127.0.0.1"

    def __post_init__(self) -> None:
        for name in ("budget_ms", "lease_s", "recovery_interval_s", "stuck_after_s",
                     "store_wait_s", "worker_beat_s", "worker_ttl_s"):
            check_number(name, getattr(self, name), low=0.0)
        check_durable_wait(self.durable_wait_ms, self.budget_ms)
        check_number("heartbeat_s", self.heartbeat_s, low=0.0, inclusive=True,
                     note="0 means lease_s / 3")
        if self.heartbeat_s == 0:
            object.__setattr__(self, "heartbeat_s", self.lease_s / 3)
        if self.heartbeat_s >= self.lease_s:
            raise ConfigError(
                f"heartbeat_s ({self.heartbeat_s}) must be shorter than lease_s ({self.lease_s}), "
                "or every lease expires between two heartbeats."
            )
        if self.worker_ttl_s <= self.worker_beat_s:
            raise ConfigError(
                f"worker_ttl_s ({self.worker_ttl_s}) must be longer than worker_beat_s "
                f"({self.worker_beat_s}), or a live worker is presumed dead between two beats."
            )
        for name in ("max_attempts", "max_recoveries", "recovery_page", "max_state_bytes",
                     "queue_max", "unencoded_max_bytes"):
            check_number(name, getattr(self, name), low=0, whole=True)
        check_queue_full(self.queue_full)
        check_spill_dir(self.spill_dir)
        parse_codec(self.codec)
        check_metrics_port(self.metrics_port)
        check_metrics_bind(self.metrics_bind)
        try:
            open_store(self.store)  # parses the URL only: nothing connects yet
        except ConfigError:
            raise
        except LivingAIError as exc:
            raise ConfigError(f"store: {exc}. Accepted: {ACCEPTED_SCHEMES}.") from None

    def __repr__(self) -> str:
        # The store URL may carry a password: never show it (logs, tracebacks, debuggers).
        shown = ", ".join(f"{f.name}={(mask_url(v) if f.name == 'store' else v)!r}"
                          for f in dataclasses.fields(self) for v in [getattr(self, f.name)])
        return f"Settings({shown})"

    def with_store_url(self, url: str) -> Settings:
        """These settings, naming a store handed over as an instance: its URL is not parsed
        (a store of one's own may have a scheme open_store() does not know)."""
        copy = dataclasses.replace(self)
        object.__setattr__(copy, "store", url)
        return copy

    @classmethod
    def resolve(cls, conf: Mapping[str, Any] | None = None, **overrides: Any) -> Settings:
        """Keywords win over the Celery config (`livingai_<name>`), which wins over the
        environment (`LIVINGAI_<NAME>`), which wins over the defaults."""
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = set(overrides) - set(names)
        if unknown:
            raise ConfigError(f"Unknown livingai_tasks setting(s) {sorted(unknown)}. "
                              f"Accepted: {sorted(names)}.")
        values: dict[str, Any] = {}
        sources: dict[str, str] = {}
        for name in names:
            raw: Any = None
            source = ""
            if overrides.get(name) is not None:
                raw, source = overrides[name], f"install({name}=...)"
            elif conf is not None and conf.get(f"livingai_{name}") is not None:
                raw, source = conf.get(f"livingai_{name}"), f"Celery config livingai_{name}"
            elif os.environ.get(f"LIVINGAI_{name.upper()}"):
                raw, source = os.environ[f"LIVINGAI_{name.upper()}"], f"LIVINGAI_{name.upper()}"
            if source:
                values[name] = _coerce(raw, _TYPES[name], source)
                sources[name] = source
        try:
            return cls(**values)
        except ConfigError as exc:
            # The checks name the setting; say where its value came from too, since that is
            # where it gets fixed (a keyword, the Celery config, or the environment).
            message = str(exc)
            named = message.split(" ", 1)[0].rstrip(":")
            if named in sources and not sources[named].startswith("install("):
                raise ConfigError(f"{message.removesuffix('.')} (set by {sources[named]}).") \
                    from None
            raise


# Each setting's type, read off the dataclass (annotations are strings here, PEP 563).
_TYPES: dict[str, Callable[[Any], Any]] = {
    f.name: {"str": str, "float": float, "int": int}[str(f.type)]
    for f in dataclasses.fields(Settings)
}


def _coerce(raw: Any, kind: Callable[[Any], Any], source: str) -> Any:
    if kind is int and isinstance(raw, float) and not raw.is_integer():
        raise ConfigError(f"{source} must be a whole number, got {raw!r}.")
    if kind in (int, float) and isinstance(raw, bool):
        raise ConfigError(f"{source} must be a number, got {raw!r}.")
    try:
        return kind(raw)
    except (TypeError, ValueError):
        accepted = ("a whole number" if kind is int else "a number" if kind is float
                    else "text")
        raise ConfigError(f"{source} must be {accepted}, got {raw!r}.") from None


def check_number(name: str, value: object, *, low: float, inclusive: bool = False,
                 whole: bool = False, note: str = "") -> None:
    """ConfigError naming `name` unless `value` is a finite number (an int if `whole`;
    never a bool) above `low` (or equal to it if `inclusive`)."""
    rule = f"{'>=' if inclusive else '>'} {low:g}"
    kind = "a whole number" if whole else "a finite number"
    aside = f" ({note})" if note else ""
    if (isinstance(value, bool) or not isinstance(value, int if whole else (int, float))
            or not math.isfinite(value)):
        raise ConfigError(f"{name} must be {kind} {rule}{aside}, got {value!r}.")
    if not (value >= low if inclusive else value > low):
        raise ConfigError(f"{name} must be {rule}{aside}, got {value!r}.")


def check_durable_wait(durable_wait_ms: object, budget_ms: float) -> None:
    """ConfigError unless 0 <= durable_wait_ms <= budget_ms (a save never waits past its
    budget); `budget_ms` already checked."""
    ok = (isinstance(durable_wait_ms, (int, float)) and not isinstance(durable_wait_ms, bool)
          and 0 <= durable_wait_ms <= budget_ms)
    if not ok:
        raise ConfigError(f"durable_wait_ms must be between 0 and budget_ms "
                          f"({budget_ms:g}), got {durable_wait_ms!r}.")


def check_queue_full(queue_full: object) -> None:
    if queue_full == "block":
        # Refused rather than mapped: "block" held the agent up to 1 s, then dropped; a
        # deployment that chose it should learn that neither happens any more.
        raise ConfigError("queue_full 'block' was replaced by 'spill' (the default): a full "
                          "queue spills to spill_dir instead of holding the agent and then "
                          "dropping. Use 'spill', or 'drop' to drop without using disk.")
    if queue_full not in _QUEUE_FULL:
        raise ConfigError(f"queue_full must be 'spill' or 'drop', got {queue_full!r}.")


def check_spill_dir(spill_dir: object) -> None:
    """ConfigError unless `spill_dir` is a non-empty path (it need not exist yet)."""
    if not isinstance(spill_dir, str) or not spill_dir.strip():
        raise ConfigError(f"spill_dir must be a folder path (created on demand), "
                          f"got {spill_dir!r}.")


def check_metrics_port(port: object) -> None:
    """ConfigError unless `port` is 0 (no metrics endpoint) or a TCP port 1..65535."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigError(f"metrics_port must be a TCP port 1..65535 for the worker's "
                          f"/metrics endpoint, or 0 for none; got {port!r}.")


def check_metrics_bind(bind: object) -> None:
    """ConfigError unless `bind` is an IPv4 or IPv6 address (not a host name: the endpoint
    must listen where the operator meant, not wherever a name resolves today)."""
    try:
        ipaddress.ip_address(bind if isinstance(bind, str) else "")
    except ValueError:
        raise ConfigError(f"metrics_bind must be an IP address of this host to listen on, "
                          f"e.g. 127.0.0.1 (this host only) or 0.0.0.0 (every interface, for "
                          f"a scraper on the container network); got {bind!r}.") from None


def parse_codec(codec: str | int | Codec) -> Codec:
    """The Codec `codec` names (a Codec, its name or its number); ConfigError otherwise."""
    try:
        return Codec.parse(codec)
    except LivingAIError as exc:
        raise ConfigError(str(exc)) from None
    except (AttributeError, TypeError):
        raise ConfigError(f"Unknown codec {codec!r}. Accepted: none, zlib, zstd.") from None
