"""The chaos run's plan, as pure logic: which fault kinds run against which store, at which
settings, judged against which targets (the runs themselves: test_loadtest_chaos_smoke.py
and test_loadtest_all_quick.py)."""

from __future__ import annotations

import dataclasses

import pytest

import livingai_tasks as lai
from loadtest.chaos.config import TUNED, config_of
from loadtest.chaos.faults import FAULT_KINDS, applies, parse_faults
from loadtest.chaos.workload import _plan
from loadtest.core.context import RunContext


def test_faults_are_parsed_in_a_fixed_order_and_unknown_names_are_refused() -> None:
    assert parse_faults("sigstop, sigkill-child") == ("sigkill-child", "sigstop")
    with pytest.raises(ValueError, match="unknown fault 'oom'; choose from sigkill-child"):
        parse_faults("sigstop,oom")


def test_a_store_outage_needs_a_server_and_everything_else_runs_on_every_store() -> None:
    assert "sqlite is a local file" in (applies("store-outage", "sqlite") or "")
    for fault in FAULT_KINDS:
        for store in ("redis", "postgres", "tiered"):
            assert applies(fault, store) is None
    cfg = config_of(RunContext(stores=["sqlite", "redis"], options={"faults": FAULT_KINDS}))
    runs, skipped = _plan(cfg)
    assert {(s, f) for _, s, f in runs} == {(s, f) for s in ("redis", "sqlite")
                                           for f in FAULT_KINDS} - {("sqlite", "store-outage")}
    assert list(skipped) == ["store-outage sqlite"]


def test_the_default_run_is_every_fault_at_the_librarys_own_settings() -> None:
    cfg = config_of(RunContext())
    assert cfg.faults == FAULT_KINDS
    [variant] = cfg.variants
    defaults = dataclasses.asdict(lai.Settings())
    assert variant.name == "defaults" and variant.env == {}  # the workers set nothing
    assert variant.setting("lease_s") == defaults["lease_s"]
    assert variant.setting("recovery_interval_s") == defaults["recovery_interval_s"]
    # A pause outlasts both the lease and (where the library has one) the worker TTL.
    assert variant.pause_s > max(defaults["lease_s"], defaults.get("worker_ttl_s", 0))
    assert variant.target_s("sigkill-worker") == 15.0  # issue 18's figures at defaults
    assert variant.target_s("sigkill-child") == 10.0
    assert variant.target_s("store-outage") is None


def test_tuned_adds_a_variant_that_sets_only_the_tuned_settings() -> None:
    cfg = config_of(RunContext(options={"tuned": True, "lease_s": 5.0}))
    assert [v.name for v in cfg.variants] == ["defaults", "tuned"]
    tuned = cfg.variants[1]
    assert tuned.env == {"LIVINGAI_LEASE_S": "5.0",
                         "LIVINGAI_RECOVERY_INTERVAL_S": str(TUNED["recovery_interval_s"]),
                         "LIVINGAI_STUCK_AFTER_S": str(TUNED["stuck_after_s"])}
    assert tuned.target_s("sigkill-worker") == 2 * (5.0 + TUNED["recovery_interval_s"])
