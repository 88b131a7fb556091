"""The broker stopped and restarted while real agents publish and the real server ingests.

Covered elsewhere, not repeated here: one link and a test subscriber across an outage
(tests/device_agent/test_link.py), the server's subscriber across a broker restart with a test publisher
(tests/fleet_server/test_mqtt_ingest.py), `device-agent run` through an outage (tests/device_agent/test_run_e2e.py).
Here the whole chain runs at once: simulated devices (real agent code: windows, outbox, signed MQTT link) keep
predicting while Mosquitto (persistence on) is stopped twice, each time for longer than the devices' reconnect
backoff, and started again on the same port. Afterwards every window closed on a device is stored exactly once.
"""

from __future__ import annotations

import time

from tests.hardening.fault_fixtures import Rig, Traffic, assert_exactly_once, rig, wait_until

__all__ = ["rig"]


def test_broker_restarts_during_ingest_lose_no_window_and_store_none_twice(rig: Rig) -> None:
    fleet = rig.fleet(6, "brk", window_count=10)
    fleet.start()
    traffic = Traffic(fleet, rig.rows())
    try:
        assert traffic.wait_rounds(5, 60)
        assert wait_until(lambda: rig.server.metric("edgefleet_ingest_stored_total") > 0, 30, 0.2)
        for outage in (2.0, 4.0):
            rig.broker.stop()  # SIGTERM: Mosquitto saves its queue (the server's persistent session) and exits
            down_from = traffic.rounds
            time.sleep(outage)
            assert traffic.rounds > down_from, "devices stopped serving while the broker was down"
            queued = sum(d.runner.agent.sink.counters()["summary_rows"] for d in fleet.devices)
            assert queued > 0, "no window was closed while the broker was down: the outage tested nothing"
            assert all(d.runner.link.state != "connected" for d in fleet.devices)
            rig.broker.start()  # same port
            assert wait_until(lambda: all(d.runner.link.state == "connected" for d in fleet.devices), 30, 0.1)
            assert traffic.wait_rounds(5, 60)
    finally:
        made = traffic.close()
    fleet.flush_windows()

    totals = assert_exactly_once(rig.server, fleet, timeout=90)
    assert sum(dt.predictions for dt, _ in totals.values()) == made
    assert [d.runner.link.counters()["reconnects"] for d in fleet.devices] == [2] * len(fleet.devices)
    assert rig.server.alive()
    assert rig.server.quarantine() == []
