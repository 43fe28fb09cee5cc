"""Where a run's results go, and how they are written: one JSON writer for every workload."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["RESULTS_ROOT", "write_json"]

RESULTS_ROOT = Path(__file__).resolve().parents[1] / "results"  # git-ignored


def write_json(path: Path, data: dict[str, Any]) -> Path:
    """`data` as indented JSON (anything else JSON cannot hold, as its str())."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, default=str) + "\n")
    return path
