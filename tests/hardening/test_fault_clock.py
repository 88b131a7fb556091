"""The device's wall clock jumps forward and back (an NTP step, a dead RTC battery, an operator's typo).

Windows close by a monotonic clock (time or count), so a jump never closes or stretches one; only the window's
start and end timestamps come from the wall clock (``device_agent.agent.utcnow``). The agent has no clock
parameter, so the tests replace that one name with the real clock plus an offset (the seam; a ``clock``
argument on ``Agent`` would be the cleaner hook, see docs/hardening.md). The trust store's high-water mark
against a clock set back is tested in tests/hardening/test_trust_clock.py.

Found by these tests and fixed (device_agent/summarizer.py): a window open while the clock stepped back ended
before it started. The server quarantined it as ``schema`` ("summary.window.end is before its start"), and
when it was held back for k it broke every later window of that version for good (each merge re-read it and
failed). Now its start is set to its end (the later clock).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import device_agent.agent as agent_module
from device_agent.agent import Agent
from device_agent.config import DeviceDir
from device_agent.outbox import Outbox
from device_agent.provision import ProvisionRequest, provision
from edgefleet_contracts.signing import generate_key, save_public_key
from edgefleet_contracts.summary import SUMMARY_TYPE, Summary
from edgefleet_contracts.timeutil import fmt, utcnow
from tests.hardening.fault_fixtures import Rig, Traffic, device_totals, rig, server_totals, wait_until

__all__ = ["rig"]


def _summaries(doc: Any) -> dict[int, str]:
    """seq -> window end of the summaries inside a quarantined payload (an envelope or a list of them)."""
    if isinstance(doc, dict):
        if doc.get("type") == SUMMARY_TYPE and isinstance(doc.get("seq"), int):
            return {int(doc["seq"]): str(doc["window"]["end"])}
        doc = list(doc.values())
    out: dict[int, str] = {}
    if isinstance(doc, list):
        for v in doc:
            out.update(_summaries(v))
    return out


class Clock:
    """The real UTC clock plus ``offset`` (changed by the test at any moment: a jump)."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def __call__(self) -> dt.datetime:
        return utcnow() + self.offset


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(agent_module, "utcnow", c)
    return c


def _device(built: Any, folder: Path, **config: Any) -> DeviceDir:
    fleet_key = folder / "fleet.pub"
    folder.mkdir(parents=True, exist_ok=True)
    save_public_key(generate_key().public_key(), fleet_key)
    res = provision(ProvisionRequest(directory=folder / "dev", device_id="dev-clock", target="x86_64-avx2",
                                     root_key=built.keys / "root.pub", fleet_key=fleet_key, package=built.package))
    res.device.save_config(replace(res.device.load_config(), **config))
    return res.device


def test_a_clock_stepped_back_inside_a_held_window_does_not_break_later_windows(
        built: Any, tmp_path: Path, clock: Clock) -> None:
    dev = _device(built, tmp_path, min_window_samples=5, allow_small_windows=True,
                  window_count=1_000_000)
    with np.load(built.holdout) as z:
        x = np.asarray(z["x"], dtype=np.float32)
    agent = Agent.open(dev.path, background=False)
    try:
        for row in x[:2]:
            agent.predict(row)
        clock.offset = -dt.timedelta(hours=2)  # stepped back while the window is open
        agent.close_window(wait=True)  # 2 < k = 5: held back, to be merged into the next window
        for row in x[2:9]:
            agent.predict(row)
        agent.close_window(wait=True)
        for row in x[9:15]:
            agent.predict(row)
        agent.close_window(wait=True)
        assert agent.summarizer.failures == 0
        outbox = agent.sink
        assert isinstance(outbox, Outbox)
        rows = [Summary.from_dict(r.document()) for r in outbox.peek(100) if r.kind == "summary"]
    finally:
        agent.close()
    # Both later windows were stored; the first carries the held one (merged: 2 windows, 9 predictions).
    assert [(s.seq, s.count, s.windows) for s in rows] == [(1, 9, 2), (2, 6, 1)]
    assert all(s.start <= s.end for s in rows)


def test_clock_jumps_store_every_window_once_or_quarantine_it_as_future(rig: Rig, clock: Clock) -> None:
    t0 = utcnow()
    fleet = rig.fleet(3, "clk", window_count=10)
    fleet.start()
    traffic = Traffic(fleet, rig.rows(), batch=5, pause=0.05)

    def windows_pass(n: int = 3) -> None:
        start = {d.device_id: device_totals(d).enqueued for d in fleet.devices}
        assert wait_until(lambda: all(device_totals(d).enqueued >= start[d.device_id] + n for d in fleet.devices),
                          60, 0.05)

    def rejected_future() -> float:
        return rig.server.rejected("future_timestamp")

    try:
        windows_pass()
        clock.offset = dt.timedelta(minutes=3)  # ahead, but inside the server's 5 minutes of skew: stored
        windows_pass()
        clock.offset = -dt.timedelta(hours=2)  # stepped back: the open window ends before it started
        windows_pass()
        clock.offset = dt.timedelta(0)
        windows_pass()
        clock.offset = dt.timedelta(days=1)  # a day ahead: refused as future, quarantined with the reason
        windows_pass()
        clock.offset = dt.timedelta(0)  # back again: the window spanning the jump ends before it started
        windows_pass()
    finally:
        traffic.close()
    fleet.flush_windows()
    assert wait_until(lambda: all(device_totals(d).queued_summaries == 0 for d in fleet.devices), 60, 0.1)

    def read_quarantine() -> dict[str, dict[int, str]]:
        out: dict[str, dict[int, str]] = {}
        for device, reason, detail, payload in rig.server.db("SELECT device_id, reason, detail, payload FROM "
                                                             "quarantine"):
            assert reason == "future_timestamp", detail  # never `schema`: no window ends before its start
            out.setdefault(device, {}).update(_summaries(json.loads(payload)))
        return out

    # An empty outbox means the broker has every window, not that the server has judged them all yet: wait
    # (bounded) until each window is stored or quarantined before reading the quarantine.
    def all_judged() -> bool:
        q = read_quarantine()
        return all(server_totals(rig.server, d.device_id).rows + len(q.get(d.device_id, {}))
                   >= device_totals(d).enqueued for d in fleet.devices)

    assert wait_until(all_judged, 60, 0.1)
    quarantined = read_quarantine()
    assert rejected_future() >= sum(len(v) for v in quarantined.values()) > 0
    # Exactly the windows that ended while the clock was a day ahead were refused.
    assert all(end >= fmt(t0 + dt.timedelta(hours=20)) for q in quarantined.values() for end in q.values())
    for d in fleet.devices:
        dt_ = device_totals(d)
        assert dt_.summarizer_failures == 0
        lost = sorted(quarantined.get(d.device_id, {}))
        def all_there(device: str = d.device_id, n: int = dt_.enqueued - len(lost)) -> bool:
            return server_totals(rig.server, device).rows == n

        assert wait_until(all_there, 30, 0.1), (
            d.device_id, dt_, server_totals(rig.server, d.device_id), len(lost),
            [ln for ln in httpx.get(f"{rig.server.url}/metrics", timeout=10).text.splitlines()
             if ln.startswith(("edgefleet_ingest_rejected_total", "edgefleet_ingest_dropped_total"))])
        st = server_totals(rig.server, d.device_id)
        assert sorted(st.seqs + lost) == list(range(1, dt_.enqueued + 1))  # each window once, stored or refused
        assert lost, f"{d.device_id}: no window closed while its clock was a day ahead"
        ends = [e for (e,) in rig.server.db("SELECT window_end FROM summaries WHERE device_id = ?", (d.device_id,))]
        assert max(ends) < fmt(t0 + dt.timedelta(hours=1))
