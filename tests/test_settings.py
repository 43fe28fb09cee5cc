"""Settings: the one place defaults live and are checked; CheckpointEngine reads its defaults
and its checks from there, and from_settings() builds an engine from one (pure logic)."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest

from livingai_tasks import Codec, ConfigError, ExecutionNode, NodeType, StateTooLargeError
from livingai_tasks.engine import CheckpointEngine
from livingai_tasks.metrics import Metrics
from livingai_tasks.settings import Settings, parse_codec
from livingai_tasks.stores.memory import MemoryStore

pytestmark = pytest.mark.timeout(60)

# The engine's part of Settings: what from_settings() passes on, and whose defaults the
# engine's keywords take.
ENGINE_SETTINGS = ("budget_ms", "durable_wait_ms", "codec", "queue_max", "queue_full",
                   "spill_dir", "max_state_bytes", "unencoded_max_bytes")
FLOAT_SETTINGS = tuple(f.name for f in dataclasses.fields(Settings) if f.type == "float")


def message_of(build: Any, **kwargs: Any) -> str:
    with pytest.raises(ConfigError) as info:
        build(**kwargs)
    return str(info.value)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("name", FLOAT_SETTINGS)
def test_non_finite_numbers_are_refused_naming_the_setting_and_what_is_accepted(
    name: str, value: float
) -> None:
    message = message_of(Settings, **{name: value})
    assert message.startswith(f"{name} must be "), message
    assert f"got {value!r}" in message
    # What is accepted: a finite number, or (for the wait) a range bounded by the budget.
    assert "finite number" in message or "between 0 and budget_ms (50)" in message, message


def test_an_infinite_budget_from_the_environment_fails_at_resolve(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LIVINGAI_BUDGET_MS", "inf")
    with pytest.raises(ConfigError, match=re.escape("budget_ms must be a finite number > 0, "
                                                    "got inf (set by LIVINGAI_BUDGET_MS).")):
        Settings.resolve()
    monkeypatch.setenv("LIVINGAI_BUDGET_MS", "nan")
    with pytest.raises(ConfigError, match="budget_ms must be a finite number > 0, got nan"):
        Settings.resolve()


@pytest.mark.parametrize(("name", "value", "message"), [
    ("queue_max", 1.5, "queue_max must be a whole number > 0, got 1.5."),
    ("max_attempts", True, "max_attempts must be a whole number > 0, got True."),
    ("recovery_page", 0, "recovery_page must be > 0, got 0."),
    ("budget_ms", False, "budget_ms must be a finite number > 0, got False."),
    ("heartbeat_s", -1.0, "heartbeat_s must be >= 0 (0 means lease_s / 3), got -1.0."),
])
def test_each_setting_is_checked_with_a_message_naming_it(
    name: str, value: Any, message: str
) -> None:
    assert message_of(Settings, **{name: value}) == message


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"durable_wait_ms": 60.0}, "durable_wait_ms must be between 0 and budget_ms (50), got 60.0."),
    ({"budget_ms": 1.0}, "durable_wait_ms must be between 0 and budget_ms (1), got 2.0."),
    ({"durable_wait_ms": -1.0}, "durable_wait_ms must be between 0 and budget_ms (50), got -1.0."),
])
def test_engine_and_settings_both_refuse_a_wait_past_the_budget(
    kwargs: dict[str, Any], message: str
) -> None:
    """The engine used to clamp durable_wait_ms to budget_ms silently; Settings refused it."""
    assert message_of(Settings, **kwargs) == message
    assert message_of(CheckpointEngine, store=MemoryStore(), **kwargs) == message


@pytest.mark.parametrize(("name", "value"), [
    ("budget_ms", 0), ("budget_ms", math.inf), ("budget_ms", math.nan), ("budget_ms", True),
    ("queue_max", 0), ("queue_max", 2.0), ("queue_full", "wait"), ("queue_full", "block"),
    ("spill_dir", ""), ("spill_dir", 3), ("max_state_bytes", -1),
    ("unencoded_max_bytes", 0), ("codec", "lz4"),
])
def test_engine_and_settings_refuse_the_same_values_with_the_same_message(
    name: str, value: Any
) -> None:
    from_settings = message_of(Settings, **{name: value})
    from_engine = message_of(CheckpointEngine, store=MemoryStore(), **{name: value})
    assert from_engine == from_settings
    assert name in from_settings


def test_the_engine_s_defaults_are_the_settings_defaults() -> None:
    defaults = Settings()
    parameters = inspect.signature(CheckpointEngine).parameters
    for name in ENGINE_SETTINGS:
        expected = getattr(defaults, name)
        if name == "codec":
            expected = parse_codec(expected)
        assert parameters[name].default == expected, name


def test_from_settings_passes_on_every_engine_setting(tmp_path: Path) -> None:
    settings = Settings(budget_ms=80.0, durable_wait_ms=7.0, codec="zlib", queue_max=5,
                        queue_full="drop", spill_dir=str(tmp_path), max_state_bytes=1000,
                        unencoded_max_bytes=4096)
    # None of these is a default: a setting from_settings() forgot would show.
    assert all(getattr(settings, name) != getattr(Settings(), name) for name in ENGINE_SETTINGS)
    metrics = Metrics()
    engine = CheckpointEngine.from_settings(MemoryStore(), settings, metrics=metrics)
    try:
        assert engine.metrics is metrics
        assert engine._budget.budget_s == pytest.approx(0.080)
        assert engine._budget.durable_wait_s == pytest.approx(0.007)
        assert engine._codec is Codec.ZLIB
        assert (engine._queue_max, engine._queue_full) == (5, "drop")
        assert engine._spill_dir == str(tmp_path)
        assert engine._unencoded_max_bytes == 4096
        # And as a caller sees them: the state limit and the codec of what is stored.
        n = ExecutionNode(execution_id="e1", type=NodeType.PROMPT)
        with pytest.raises(StateTooLargeError, match="the limit is 1000"):
            engine.save(n, b"x" * 1001)
        saved = engine.save(n, b"x" * 1000, durable=True)
        assert saved.durable and saved.node.checkpoint is not None
        assert saved.node.checkpoint[0] == Codec.ZLIB
    finally:
        engine.close()


def test_from_settings_without_metrics_records_into_its_own() -> None:
    first = CheckpointEngine.from_settings(MemoryStore(), Settings())
    second = CheckpointEngine.from_settings(MemoryStore(), Settings())
    assert isinstance(first.metrics, Metrics) and first.metrics is not second.metrics


def test_the_default_spill_dir_is_a_folder_of_this_user_in_the_temp_dir(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    default = Settings().spill_dir
    assert default.startswith(tempfile.gettempdir())
    assert default.endswith(f"livingai-spill-{os.getuid()}")
    monkeypatch.setenv("LIVINGAI_SPILL_DIR", str(tmp_path / "spill"))
    assert Settings.resolve().spill_dir == str(tmp_path / "spill")


def test_queue_full_block_is_refused_saying_what_replaced_it() -> None:
    message = message_of(Settings, queue_full="block")
    assert "replaced by 'spill'" in message and "'drop'" in message
    assert Settings().queue_full == "spill"
