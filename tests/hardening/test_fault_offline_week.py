"""Offline for a simulated week: windows close by count (accelerated), many more than the outbox bound while the
broker is away, then the link returns.

A week of 10-minute windows is 1,008 windows; each simulated device closes that many (10 predictions each) with
the broker stopped and an outbox bound of 50 rows, so the outbox merges the oldest never-sent rows over and
over. Afterwards: the outbox never held more than its bound, nothing was unmergeable, every window was
delivered exactly once (the stored rows' ``windows`` add up to the windows the device closed, their ``count``
to its predictions) and the rows sent before the outage were never merged into later ones.

A backlog larger than the server's per-device rate allows at once (the default bound is 10,000 rows; a week of
5-minute windows is 2,016) is paced by the link instead of being refused by the server.
"""

from __future__ import annotations

import time

import pytest

from device_agent.link_books import Pace
from tests.hardening.fault_fixtures import Rig, assert_exactly_once, device_totals, rig, server_totals, wait_until

__all__ = ["rig"]

WEEK = 7 * 24 * 6  # 10-minute windows
BOUND = 50


def test_a_week_offline_is_delivered_exactly_once_within_the_outbox_bound(rig: Rig) -> None:
    fleet = rig.fleet(3, "wk", window_count=10, outbox_max_rows=BOUND)
    fleet.start()
    from fleet_server.simulator import rows_sampler

    sample = rows_sampler(rig.rows(), 5)
    fleet.stream(sample, 30)  # three windows each while online
    assert wait_until(lambda: all(server_totals(rig.server, d.device_id).rows == 3 for d in fleet.devices), 30, 0.1)
    rig.broker.stop()
    assert wait_until(lambda: all(d.runner.link.state != "connected" for d in fleet.devices), 10, 0.05)

    peak = 0
    for _ in range(WEEK // 48):  # a week in 21 chunks of 48 windows (8 hours); the bound is checked between
        fleet.stream(sample, 480, workers=3)
        peak = max([peak, *(d.runner.agent.sink.counters()["summary_rows"] for d in fleet.devices)])
    assert wait_until(lambda: all(device_totals(d).enqueued == d.runner.agent.counters.windows_closed
                                  for d in fleet.devices), 120, 0.1)
    for d in fleet.devices:
        c = d.runner.agent.sink.counters()
        assert d.runner.agent.counters.windows_closed == 3 + WEEK
        assert c["summary_rows"] <= BOUND and c["overflow_unmergeable"] == 0, c
        assert c["merged_total"] == WEEK - c["summary_rows"], c  # every window beyond the bound was merged
    assert BOUND - 1 <= peak <= BOUND

    rig.broker.start()
    totals = assert_exactly_once(rig.server, fleet, timeout=120)
    for dt, st in totals.values():
        assert dt.enqueued == 3 + WEEK and st.windows == 3 + WEEK
        assert st.rows == 3 + BOUND  # the three sent before the outage kept apart, the week in 50 rows
    assert rig.server.quarantine() == []


BACKLOG = 720  # more than the server takes from one device at once (600 a minute, bursts of 600)


def test_a_backlog_past_the_servers_rate_limit_is_paced_and_stored_not_refused(rig: Rig) -> None:
    # Found by this test: with the default outbox bound (10,000 rows) a device back from a long outage sent its
    # whole backlog at once; the server stored the first 600, quarantined the next 600 as `rate_limited` and
    # dropped the rest, while the device deleted them all (acknowledged). The link now paces summaries at
    # 480 a minute (device_agent/link_books.Pace).
    fleet = rig.fleet(1, "bk", window_count=5)
    dev = fleet.devices[0]
    fleet.start()
    from fleet_server.simulator import rows_sampler

    rig.broker.stop()
    assert wait_until(lambda: dev.runner.link.state != "connected", 10, 0.05)
    fleet.stream(rows_sampler(rig.rows(), 9), 5 * BACKLOG, workers=1)
    assert wait_until(lambda: device_totals(dev).enqueued == BACKLOG, 60, 0.1)
    assert dev.runner.agent.sink.counters()["merged_total"] == 0  # under the bound: nothing merged

    rig.broker.start()
    t0 = time.monotonic()
    assert_exactly_once(rig.server, fleet, timeout=120)
    drained = time.monotonic() - t0
    assert rig.server.quarantine() == []
    assert rig.server.rejected("rate_limited") == 0
    assert drained > (BACKLOG - 480) / 8 * 0.8  # paced: 480 at once, then 8 a second


def test_the_pace_allows_a_burst_then_the_rate() -> None:
    p = Pace(480, now=100.0)
    assert p.allowed(100.0) == 480
    p.take(480, 100.0)
    assert p.allowed(100.0) == 0 and p.wait(100.0) == pytest.approx(0.125)
    assert p.allowed(101.0) == 8  # 8 a second
    assert p.allowed(10_000.0) == 480  # never more than one burst
    assert Pace(0, now=0.0).allowed(0.0) > 10**6 and Pace(0, now=0.0).wait(0.0) == 0.0
