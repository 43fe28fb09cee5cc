"""What install() refuses in a Celery app's config, and what it keeps out of sight there.

Refused: any serializer or accepted content type that is not a data-only format. A message
or result from the broker must never be able to run code, and pickle can; so is refused
whatever it is called (`pickle` or its content type), and anything unknown, since a
serializer registered by name may decode with pickle too. Checked at install() and again
when a worker starts, so config changed after install() is caught before any message is read.

Kept out of sight: the store URL's password. Celery's `inspect conf` (which Flower's worker
Config tab shows) prints every setting whose name does not look secret, `livingai_store`
included; the config keeps the masked URL and the real one stays in this process.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..stores import mask_url

__all__ = ["refuse_unsafe_serializers", "hide_store_secret", "STORE_KEY"]

log = logging.getLogger("livingai_tasks")

STORE_KEY = "livingai_store"
# Data-only formats: kombu's json, msgpack, and yaml (which kombu decodes with safe_load).
_SAFE = {"json": "application/json", "msgpack": "application/x-msgpack",
         "yaml": "application/x-yaml"}
_SAFE_TYPES = set(_SAFE.values())
_SERIALIZER_KEYS = ("task_serializer", "result_serializer", "event_serializer")
_ACCEPT_KEYS = ("accept_content", "result_accept_content")


def _data_only(name: Any) -> bool:
    text = str(name).strip().lower()
    return text in _SAFE or text in _SAFE_TYPES


def refuse_unsafe_serializers(conf: Mapping[str, Any], where: str) -> None:
    """ConfigError naming every setting that lets a message run code (`where`: when it was
    found, for the message)."""
    found = []
    for key in _SERIALIZER_KEYS:
        value = conf.get(key)
        if value is not None and not _data_only(value):
            found.append(f"{key}={value!r}")
    for key in _ACCEPT_KEYS:
        accepted = conf.get(key) or []
        if isinstance(accepted, str):
            accepted = [accepted]
        unsafe = [a for a in accepted if not _data_only(a)]
        if unsafe:
            found.append(f"{key} includes {unsafe!r}")
    if found:
        raise ConfigError(
            f"livingai_tasks refuses {', '.join(found)} ({where}): a message or result from "
            "the broker must never be able to run code, and pickle can. Accepted: "
            f"{', '.join(sorted(_SAFE))} (or their content types); 'json' is Celery's default."
        )


# masked URL -> real URL, for the store URLs this process took out of a Celery config
_real_urls: dict[str, str] = {}
_real_urls_lock = threading.Lock()


def hide_store_secret(conf: Any) -> Mapping[str, Any]:
    """Put the masked store URL in place of the real one in `conf`, and return a view of
    `conf` in which the store is the real URL again (what install() resolves from). A
    second install() in the same process finds the masked URL and gets the real one back."""
    raw = conf.get(STORE_KEY)
    if not isinstance(raw, str):
        return conf  # type: ignore[no-any-return]
    with _real_urls_lock:
        real = _real_urls.get(raw, raw)
        masked = mask_url(real)
        if masked != real:
            _real_urls[masked] = real
            conf[STORE_KEY] = masked
    return _WithStore(conf, real)


class _WithStore(Mapping[str, Any]):
    def __init__(self, conf: Mapping[str, Any], store: str) -> None:
        self._conf = conf
        self._store = store

    def __getitem__(self, key: str) -> Any:
        return self._store if key == STORE_KEY else self._conf[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self._store if key == STORE_KEY else self._conf.get(key, default)

    def __iter__(self) -> Any:
        return iter(self._conf)

    def __len__(self) -> int:
        return len(self._conf)
