"""Which store and which Celery app a command works on: only ones the user named.

The store: --store, else LIVINGAI_STORE, else the store the named app's install() chose
(its `livingai_store` config, or install(store=...)). The app: --app, else LIVINGAI_APP.
Nothing is guessed: a command that would publish (resolve, recover, replay) refuses
without an app, so a step never lands in a broker nobody named, and a read never creates
an empty store file in the working folder.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..celery_wing import runtime
from ..celery_wing.install import install
from ..errors import ConfigError
from ..settings import DEFAULT_STORE
from ..stores import Store, open_store

__all__ = ["named_store", "named_app", "app_named", "json_argument"]

_NO_STORE = ("no store named: pass --store URL or set LIVINGAI_STORE (or name your app with "
             "--app module:attr / LIVINGAI_APP: its install() names the store)")


def app_named(args: argparse.Namespace) -> str | None:
    return getattr(args, "app", None) or os.environ.get("LIVINGAI_APP") or None


def named_app(args: argparse.Namespace, *, why: str) -> Any:
    """The Celery app the user named, imported (its install() runs on import); the CLI's
    --store, if given, then wins for this process. ConfigError if none was named."""
    spec = app_named(args)
    if spec is None:
        raise ConfigError(f"{why}: name the Celery app to publish on with --app module:attr "
                          "(as for `celery -A`) or LIVINGAI_APP")
    module_name, _, attr = spec.partition(":")
    sys.path.insert(0, os.getcwd())  # like `celery -A`, find the user's module here
    try:
        app = getattr(importlib.import_module(module_name), attr or "app")
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"Cannot load the Celery app {spec!r} ({exc}). Pass --app "
                          "module:attribute as for `celery -A`, from the folder the module "
                          "is in (e.g. in workers/: --app agent_app:app).") from None
    if args.store:
        install(app, store=args.store)
    elif not runtime.is_configured():
        raise ConfigError(f"the Celery app {spec!r} does not call livingai_tasks.install(app)")
    return app


def named_store(args: argparse.Namespace) -> Store:
    """The store the user named (see the module docstring)."""
    url = args.store or os.environ.get("LIVINGAI_STORE")
    if url:
        return open_store(url)
    if app_named(args) is not None:
        named_app(args, why="")
        rt = runtime.get()
        return rt.store_instance or open_store(rt.settings.store)
    # The default store, only if it is there: reading must not create it.
    default = DEFAULT_STORE.removeprefix("sqlite:///")
    if Path(default).is_file():
        return open_store(DEFAULT_STORE)
    raise ConfigError(_NO_STORE)


def json_argument(text: str, what: str, example: str) -> Any:
    """A command-line argument that holds JSON, or a ConfigError saying what `what` takes."""
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{what} takes JSON, e.g. '{example}'; got {text!r} ({exc}).") from None
