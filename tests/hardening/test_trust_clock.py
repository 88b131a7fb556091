"""The trust store's clock high-water mark: pure rules (``TrustState.observed``) and the persisted shell
(``TrustStore``: 0600, atomic, re-read under a lock so a stale reader never undoes a newer keyset)."""

from __future__ import annotations

import logging
import stat
from datetime import UTC, datetime, timedelta

import pytest

from device_agent.trust_store import CLOCK_SLACK, OBSERVE_STEP, TRUST_MODE, TrustState, TrustStore, TrustStoreError
from device_agent.updater import Updater
from edgefleet_contracts.timeutil import fmt, utcnow
from tests.device_agent import new_device, packages, with_version

from .device_state import trust_doc
from .test_package_attacks import _keys

T = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# ---- the pure rules ---------------------------------------------------------------------------------------
def test_a_clock_behind_the_mark_is_counted_and_the_mark_is_used():
    s = TrustState(None, 0, T)
    back = T - timedelta(days=2)
    after = s.observed(back)
    assert after.clock_went_back == 1 and after.high_water == T
    assert after.clock_went_back_last == {"wall": fmt(back), "mark": fmt(T)}
    assert after.effective_now(back) == T
    assert after.observed(back).clock_went_back == 2  # every decision made with the clock back counts


def test_small_slips_and_small_steps_change_nothing():
    s = TrustState(None, 0, T)
    assert s.observed(T - CLOCK_SLACK + timedelta(seconds=1)) == s  # NTP slew, a packager clock a bit ahead
    assert s.observed(T + OBSERVE_STEP - timedelta(seconds=1)) == s  # not worth a write yet


def test_the_mark_follows_the_clock_forward_in_steps():
    s = TrustState(None, 0, T)
    later = T + OBSERVE_STEP
    assert s.observed(later).high_water == later
    assert s.observed(later).clock_went_back == 0


def test_an_old_trust_json_without_the_counter_still_loads():
    doc = b'{"spec": 1, "keyset": null, "keyset_version": 0, "high_water": "2026-03-01T12:00:00Z"}'
    s = TrustState.from_json(doc, "trust.json")
    assert (s.clock_went_back, s.clock_went_back_last, s.high_water) == (0, None, T)
    with pytest.raises(TrustStoreError, match="clock_went_back must be a whole number"):
        TrustState.from_json(doc.replace(b"}", b', "clock_went_back": -1}'), "trust.json")


# ---- the persisted shell ----------------------------------------------------------------------------------
def test_trust_json_is_0600_from_provisioning_on(built, tmp_path):
    dev = new_device(built, tmp_path / "dev", package=packages(built).v100)
    assert stat.S_IMODE(dev.trust_file.stat().st_mode) == TRUST_MODE == 0o600


def test_a_clock_set_back_is_logged_counted_and_persisted(built, tmp_path, caplog):
    dev = new_device(built, tmp_path / "dev")
    mark = TrustStore(dev).state.high_water
    back = mark - timedelta(days=30)
    with caplog.at_level(logging.WARNING, logger="device_agent.trust_store"):
        got = TrustStore(dev, clock=lambda: back).now()
    assert got == mark
    assert any("clock_went_back" in r.getMessage() and fmt(back) in r.getMessage() for r in caplog.records)
    doc = trust_doc(dev)
    assert doc["clock_went_back"] == 1 and doc["high_water"] == fmt(mark)
    assert doc["clock_went_back_last"] == {"wall": fmt(back), "mark": fmt(mark)}
    assert stat.S_IMODE(dev.trust_file.stat().st_mode) == 0o600


def test_the_mark_is_persisted_as_the_clock_moves_on_so_a_later_set_back_is_caught(built, tmp_path):
    dev = new_device(built, tmp_path / "dev")
    start = TrustStore(dev).state.high_water
    later = start + timedelta(days=40)  # the device ran for 40 days without an install
    TrustStore(dev, clock=lambda: later).now()
    assert trust_doc(dev)["high_water"] == fmt(later)
    # the clock is then set back to day 1: decisions still use day 40
    assert TrustStore(dev, clock=lambda: start + timedelta(days=1)).now() == later


def test_reading_the_time_without_news_writes_nothing(built, tmp_path):
    dev = new_device(built, tmp_path / "dev")
    before = dev.trust_file.read_bytes()
    ino = dev.trust_file.stat().st_ino
    for _ in range(3):
        TrustStore(dev).now()
    assert dev.trust_file.read_bytes() == before and dev.trust_file.stat().st_ino == ino


def test_a_stale_trust_store_object_never_undoes_a_newer_keyset(built, tmp_path):
    """The agent's desired-state worker may hold a TrustStore read before a CLI install accepted keyset v3;
    its next write (a clock event) re-reads trust.json under the lock and keeps v3."""
    keys = _keys(built)
    dev = new_device(built, tmp_path / "dev", package=packages(built).v100)
    stale = TrustStore(dev, clock=lambda: utcnow() - timedelta(days=3))
    assert stale.state.keyset_version == 1
    carrying_v3 = with_version(built, packages(built).v110, tmp_path / "v3.efpkg", "1.1.0", signer=keys.new_signer,
                               keyset_env=keys.v3)
    assert Updater(dev).install(carrying_v3).status == "installed"
    stale.now()  # clock behind the mark: a write
    doc = trust_doc(dev)
    assert doc["keyset_version"] == 3 and doc["clock_went_back"] == 1
    assert TrustStore(dev).trusted_keyset().version == 3  # type: ignore[union-attr]


def test_advance_keeps_an_idle_devices_mark_near_the_present_without_counting_anything(built, tmp_path):
    """The runner's housekeeping calls ``advance()``: at most one write per OBSERVE_STEP, never a clock event,
    and a clock set back afterwards is judged against the advanced mark."""
    dev = new_device(built, tmp_path / "dev")
    start = TrustStore(dev).state.high_water
    ino = dev.trust_file.stat().st_ino
    assert not TrustStore(dev, clock=lambda: start + OBSERVE_STEP - timedelta(seconds=1)).advance()
    assert not TrustStore(dev, clock=lambda: start - timedelta(days=3)).advance()  # behind: not counted here
    assert dev.trust_file.stat().st_ino == ino and trust_doc(dev)["clock_went_back"] == 0  # nothing written
    later = start + timedelta(days=40)
    assert TrustStore(dev, clock=lambda: later).advance()
    doc = trust_doc(dev)
    assert doc["high_water"] == fmt(later) and doc["clock_went_back"] == 0
    assert stat.S_IMODE(dev.trust_file.stat().st_mode) == 0o600
    assert TrustStore(dev, clock=lambda: start + timedelta(days=1)).now() == later
