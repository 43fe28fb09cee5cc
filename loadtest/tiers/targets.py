"""A checkpoint tier's store target: an isolated store (core/stores.py) for one engine,
described as a spec the fresh readback process can reopen it from."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ..core.context import RunContext
from ..core.stores import isolated

__all__ = ["Target", "provision", "LIVINGAI_KINDS"]

# livingai 0.4.1 has no tiered (Redis over PostgreSQL) store: there is nothing to compare.
LIVINGAI_KINDS = ("sqlite", "redis", "postgres")


@dataclass
class Target:
    kind: str
    impl: str  # "ours" or "livingai"
    ns: str  # id namespace; also the store's name (Redis prefix, schema, file)
    spec: dict[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        """Our open_store() URL (ours only)."""
        return str(self.spec["url"])


@contextmanager
def provision(ctx: RunContext, kind: str, impl: str, ns: str) -> Iterator[Target]:
    """An empty store target for `impl`, removed with everything it held on the way out.
    livingai's Redis keys have a fixed prefix: every id of the run starts with `ns`."""
    pattern = None if impl == "ours" else f"lai:[nce]:{ns}-*"
    with isolated(ctx.servers, kind, ns, ctx.results_dir, redis_pattern=pattern) as site:
        spec: dict[str, Any] = {"impl": impl, "kind": kind}
        if impl == "ours":
            spec["url"] = site.url
        else:
            spec.update(path=str(site.sqlite_path), redis_url=ctx.servers.redis_url,
                        schema=site.schema, dsn=ctx.servers.postgres_url.replace(
                            "postgresql+psycopg://", "postgresql://", 1))
        yield Target(kind, impl, ns, spec)
