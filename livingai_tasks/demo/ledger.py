"""The example agent's "payment provider": a table of charges, keyed by idempotency key.

Outside our stores on purpose: it is the side effect itself, counted where it happened.
"""

from __future__ import annotations

import os
import threading
from typing import Any

import sqlalchemy as sa

from ..errors import ConfigError, LivingAIError

__all__ = ["Ledger", "ledger"]

_meta = sa.MetaData()
charges = sa.Table(
    "demo_charges", _meta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("idempotency_key", sa.String(80), nullable=False, index=True),
    sa.Column("execution_id", sa.String(64), nullable=False, index=True),
    sa.Column("amount_cents", sa.Integer, nullable=False),
)


class Ledger:
    def __init__(self, url: str) -> None:
        try:
            self.url = sa.make_url(url)
        except sa.exc.ArgumentError as exc:
            raise ConfigError(f"Ledger URL {url!r} is not a SQLAlchemy URL: {exc}") from None
        self._engine: sa.Engine | None = None
        self._pid = 0
        self._lock = threading.Lock()

    @property
    def engine(self) -> sa.Engine:
        with self._lock:
            if self._engine is None or self._pid != os.getpid():  # never share across fork
                args: dict[str, Any] = {}
                if self.url.get_backend_name() == "sqlite":
                    args["connect_args"] = {"timeout": 30}
                self._engine, self._pid = sa.create_engine(self.url, **args), os.getpid()
                try:
                    _meta.create_all(self._engine)
                except sa.exc.DBAPIError:
                    # Several fresh workers create the table at once: one wins, and the
                    # others' CREATE fails. Check again rather than fail the charge.
                    _meta.create_all(self._engine)
            return self._engine

    def charge(self, key: str, execution_id: str, amount_cents: int) -> int:
        with self.engine.begin() as conn:
            result = conn.execute(charges.insert().values(
                idempotency_key=key, execution_id=execution_id, amount_cents=amount_cents))
            key_row = result.inserted_primary_key
            if key_row is None:  # every dialect we support returns the new id
                raise LivingAIError("the ledger did not return the new charge's id")
            return int(key_row[0])

    def find(self, key: str) -> int | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(charges.c.id).where(
                charges.c.idempotency_key == key)).first()
        return None if row is None else int(row[0])

    def counts(self) -> dict[str, int]:
        """Charges per execution id."""
        with self.engine.connect() as conn:
            rows = conn.execute(sa.select(charges.c.execution_id, sa.func.count())
                                .group_by(charges.c.execution_id)).all()
        return {str(eid): int(n) for eid, n in rows}


_ledger: Ledger | None = None


def ledger() -> Ledger:
    global _ledger
    if _ledger is None:
        _ledger = Ledger(os.environ.get("LIVINGAI_DEMO_LEDGER", "sqlite:///livingai-ledger.db"))
    return _ledger
