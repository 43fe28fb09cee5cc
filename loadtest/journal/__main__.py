"""`python -m loadtest.journal ...`: the journal workload alone (see workload.py)."""

from __future__ import annotations

import sys
from pathlib import Path

from ..core.context import main_alone
from .config import add_options
from .workload import NAME, run


def _no_chart(_: Path) -> Path | None:
    return None  # the figures are a table: nothing to draw


sys.exit(main_alone(NAME, run, add_options, _no_chart))
