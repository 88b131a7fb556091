"""Per-device rate limiting (issue #8: "a flood from one device: rate limited, others unaffected").

A summary over its device's rate is refused with reason ``rate_limited``: quarantined whole (replayable) while
the device's quarantine allowance lasts, then acknowledged, dropped and counted. Over a real Mosquitto with the
app's /metrics, and on the service with a frozen clock for the exact counts."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet_contracts.signing import generate_key, key_id, verify_envelope
from fleet_server.app import create_app
from fleet_server.errors import ConfigError
from fleet_server.ingest import IngestService
from fleet_server.mqtt_ingest import MqttIngest
from fleet_server.routes_ingest import attach_ingest
from fleet_server.settings import ServerSettings
from tests.brokers import Mosquitto
from tests.fleet_server.conftest import FleetFactory
from tests.fleet_server.test_mqtt_ingest import Publisher
from tests.support import wait_until


def metrics(client: TestClient) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("edgefleet_ingest_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_a_flooding_device_is_rate_limited_over_mqtt_and_another_device_loses_nothing(
        make_fleet: FleetFactory, mosquitto: Mosquitto) -> None:
    rate, allowance, flood_n, calm_n = 30, 10, 300, 20
    fleet = make_fleet(broker=mosquitto.url, device_rate_per_minute=rate,
                       rate_limited_quarantine_per_minute=allowance)
    app = create_app(fleet.settings, fleet.store)
    svc = attach_ingest(app, app.state.ctx, validator_processes=1)  # the over-rate snapshot crosses processes
    flood, calm = fleet["dev-1"], fleet["dev-2"]
    pub = Publisher(mosquitto)
    try:
        with TestClient(app) as client:
            began = time.monotonic()
            for i in range(flood_n):  # one summary per message: the costliest flood per summary
                pub.send("dev-1", flood.message([i]))
                if i % 15 == 0:
                    pub.send("dev-2", calm.message([i // 15]))
            pub.wait(60)
            assert wait_until(lambda: svc.counters.snapshot()["received"]["summary"] == flood_n + calm_n, 60), \
                svc.counters.snapshot()
            assert svc.flush(10)
            elapsed = time.monotonic() - began
            m = metrics(client)
            source = svc.sources[0]
            assert isinstance(source, MqttIngest)
            assert wait_until(lambda: source.counters()["acked"] == flood_n + calm_n, 10), source.counters()
    finally:
        pub.close()

    # The calm device is unaffected: every summary stored, none refused.
    assert fleet.seqs("dev-2") == list(range(calm_n))
    assert [q for q in fleet.quarantined() if q["device_id"] != "dev-1"] == []
    # The flooding device gets its burst (plus what refilled while the test ran), no more.
    stored = len(fleet.seqs("dev-1"))
    assert rate <= stored <= rate + int(elapsed * rate / 60) + 1, (stored, elapsed)
    refused = flood_n - stored
    assert m['edgefleet_ingest_rejected_total{reason="rate_limited"}'] == refused
    assert m["edgefleet_ingest_stored_total"] == stored + calm_n
    # Refused summaries are quarantined whole while the allowance lasts, then dropped and counted.
    kept = fleet.quarantined("rate_limited")
    assert allowance <= len(kept) <= allowance + int(elapsed * allowance / 60) + 1, (len(kept), elapsed)
    assert m['edgefleet_ingest_dropped_total{reason="rate_limited"}'] == refused - len(kept) > 0
    assert {q["device_id"] for q in kept} == {"dev-1"}
    trusted = {key_id(flood.key.public_key()): flood.key.public_key()}
    for q in kept:  # each quarantined envelope is the device's signed summary, ready to replay
        signed, _ = verify_envelope(json.loads(q["payload"]), trusted, "quarantined summary")
        assert signed["device_id"] == "dev-1" and signed["seq"] not in fleet.seqs("dev-1")
    assert m['edgefleet_ingest_rejected_total{reason="bad_signature"}'] == 0


def test_the_quarantine_allowance_bounds_rows_and_refills_with_time(make_fleet: FleetFactory) -> None:
    fleet = make_fleet(device_rate_per_minute=60, rate_limited_quarantine_per_minute=5)
    frozen = [1000.0]
    svc = IngestService(fleet.settings, fleet.store, monotonic=lambda: frozen[0])
    svc.start()
    try:
        dev = fleet["dev-1"]
        first = svc.ingest(dev.message(range(100)))
        assert first.accepted == 60 and [r.reason for r in first.rejected] == ["rate_limited"] * 40
        assert sum(r.kept for r in first.rejected) == 5
        assert len(fleet.quarantined("rate_limited")) == 5
        c = svc.counters.snapshot()
        assert c["rejected"]["rate_limited"] == 40 and c["dropped"]["rate_limited"] == 35

        # Now over the rate: refused before the signature check (stage one), same allowance.
        again = svc.ingest(dev.message(range(100, 110)))
        assert again.accepted == 0 and sum(r.kept for r in again.rejected) == 0
        # Forged summaries in the device's name are bad signatures (and take none of its tokens).
        frozen[0] += 60  # a minute refills 60 tokens and 5 quarantine places
        forged = svc.ingest(dev.message(range(200, 203), signer=generate_key()))
        assert {r.reason for r in forged.rejected} == {"bad_signature"}
        later = svc.ingest(dev.message(range(300, 370)))
        assert later.accepted == 60 and sum(r.kept for r in later.rejected) == 5
        assert len(fleet.quarantined("rate_limited")) == 10
        assert svc.counters.snapshot()["dropped"]["rate_limited"] == 35 + 10 + 5
    finally:
        assert svc.stop(10)


@pytest.mark.parametrize(("field", "value"), [("device_rate_per_minute", 0),
                                               ("rate_limited_quarantine_per_minute", -1)])
def test_rate_settings_are_validated_at_start(tmp_path: Any, field: str, value: int) -> None:
    overrides: dict[str, Any] = {field: value}
    with pytest.raises(ConfigError, match=field):
        ServerSettings(data_dir=tmp_path, **overrides)
