"""MQTT ingest against a real Mosquitto: stored exactly once, acknowledged only after commit, persistent
session across server restarts, bad messages quarantined while ingestion goes on, a real device agent's link
end to end, and a SIGKILL of the server process mid-stream that loses nothing and duplicates nothing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edgefleet_contracts.report import Report
from edgefleet_contracts.signing import generate_key, sign_envelope
from edgefleet_contracts.timeutil import fmt
from edgefleet_contracts.topics import topic
from fleet_server.broker import EmbeddedBroker
from fleet_server.ingest import IngestService
from fleet_server.mqtt_ingest import MqttIngest, mqtt_source
from tests.brokers import Mosquitto
from tests.fleet_server.conftest import FLEET, Fleet, FleetFactory, make_summary
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]


class Publisher:
    """A paho QoS 1 publisher (own network thread) that bounds its unacknowledged messages."""

    def __init__(self, broker: Mosquitto, max_inflight: int = 100) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{os.getpid()}-{id(self)}",
                                  protocol=mqtt.MQTTv311)
        self.client.max_inflight_messages_set(max_inflight)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        self.infos: list[mqtt.MQTTMessageInfo] = []

    def send(self, device: str, payload: bytes, kind: str = "summary", qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic(FLEET, device, kind), payload, qos=qos, retain=retain)
        assert info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
        self.infos.append(info)

    def wait(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        for info in self.infos:
            info.wait_for_publish(max(0.01, deadline - time.monotonic()))
            assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(mosquitto: Mosquitto) -> Iterator[Publisher]:
    pub = Publisher(mosquitto)
    yield pub
    pub.close()


Running = tuple[Fleet, IngestService, MqttIngest]


@pytest.fixture
def running(make_fleet: FleetFactory, mosquitto: Mosquitto) -> Iterator[Running]:
    fleet = make_fleet(broker=mosquitto.url)
    svc = IngestService(fleet.settings, fleet.store)
    source = mqtt_source(fleet.settings, svc, backoff_initial=0.05, backoff_max=0.5)
    assert svc.start(timeout=10), source.last_error
    yield fleet, svc, source
    assert svc.stop(timeout=10)


def test_mqtt_summaries_are_stored_exactly_once_and_a_redelivery_is_acknowledged(
        running: Running, publisher: Publisher) -> None:
    fleet, svc, source = running
    for i in range(10):
        publisher.send("dev-1", fleet["dev-1"].message(range(i * 50, i * 50 + 50)))
    publisher.send("dev-2", fleet["dev-2"].message(range(5)))
    publisher.wait()
    assert wait_until(lambda: fleet.stored() == 505, 15), fleet.stored()
    publisher.send("dev-1", fleet["dev-1"].message(range(100, 150)))  # the same message again
    publisher.wait()
    assert wait_until(lambda: svc.counters.snapshot()["duplicates"] == 50, 10)
    assert wait_until(lambda: source.counters()["acked"] == 12, 5), source.counters()
    assert fleet.seqs("dev-1") == list(range(500)) and fleet.seqs("dev-2") == list(range(5))
    assert fleet.quarantined() == []
    assert source.counters()["messages"] == 12 and source.counters()["failed"] == 0


def test_a_message_is_acknowledged_only_after_its_rows_are_committed(
        running: Running, publisher: Publisher) -> None:
    fleet, svc, source = running
    blocker = sqlite3.connect(fleet.settings.db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # the writer cannot commit
        publisher.send("dev-1", fleet["dev-1"].message(range(3)))
        assert wait_until(lambda: source.counters()["messages"] == 1, 5)
        time.sleep(0.5)
        assert source.counters()["acked"] == 0, "acknowledged before the commit"
        blocker.execute("ROLLBACK")
        assert wait_until(lambda: source.counters()["acked"] == 1, 10)
        assert fleet.seqs("dev-1") == [0, 1, 2]
    finally:
        blocker.close()


def test_bad_messages_are_quarantined_with_their_reason_and_the_next_good_one_is_stored(
        running: Running, publisher: Publisher) -> None:
    fleet, svc, source = running
    d1, d2 = fleet["dev-1"], fleet["dev-2"]
    cases = [
        ("dev-1", d2.message([1]), "topic_mismatch"),  # dev-2's own signed summary, on dev-1's topic
        ("dev-1", d1.message([1], signer=generate_key()), "bad_signature"),
        ("dev-1", b"[{]", "malformed_json"),
        ("dev-1", b"[" * 5000 + b"]" * 5000, "malformed_json"),
        ("dev-1", d1.message([1]).replace(b'"sum":10.0', b'"sum":Infinity', 1), "malformed_json"),
        ("dev-1", d1.message([1], version="2.0.0"), "unknown_model_version"),
        ("dev-1", b"x" * (10 * 1024 * 1024), "too_large"),
    ]
    good_seq = 100
    for i, (device, payload, reason) in enumerate(cases):
        publisher.send(device, payload)
        publisher.send("dev-1", d1.message([good_seq + i]))
        publisher.wait()
        assert wait_until(partial(lambda n: len(fleet.seqs("dev-1")) == n, i + 1), 10), reason
        rows = fleet.quarantined()
        assert len(rows) == i + 1 and rows[-1]["reason"] == reason and rows[-1]["source"] == "mqtt"
        assert rows[-1]["device_id"] == device  # the topic's device, or the summary's
        assert len(rows[-1]["payload"]) <= 64 * 1024
    assert fleet.seqs("dev-1") == [good_seq + i for i in range(len(cases))]
    assert fleet.seqs("dev-2") == []
    rejected = svc.counters.snapshot()["rejected"]
    assert {r: n for r, n in rejected.items() if n} == {"topic_mismatch": 1, "bad_signature": 1,
                                                         "malformed_json": 3, "unknown_model_version": 1,
                                                         "too_large": 1}
    assert wait_until(lambda: source.counters()["acked"] == 2 * len(cases), 5)  # bad ones are acknowledged too


def test_messages_published_while_the_server_is_down_arrive_when_it_returns(
        make_fleet: FleetFactory, mosquitto: Mosquitto, publisher: Publisher) -> None:
    fleet = make_fleet(broker=mosquitto.url)
    first = IngestService(fleet.settings, fleet.store)
    mqtt_source(fleet.settings, first, backoff_initial=0.05)
    assert first.start(timeout=10)
    publisher.send("dev-1", fleet["dev-1"].message(range(10)))
    publisher.wait()
    assert wait_until(lambda: fleet.stored() == 10, 10)
    assert first.stop(timeout=10)  # the broker keeps the session: same client id, clean_session False

    for i in range(1, 6):
        publisher.send("dev-1", fleet["dev-1"].message(range(i * 10, i * 10 + 10)))
    publisher.wait()
    time.sleep(0.2)
    assert fleet.stored() == 10

    second = IngestService(fleet.settings, fleet.store)
    mqtt_source(fleet.settings, second, backoff_initial=0.05)
    assert second.start(timeout=10)
    try:
        assert wait_until(lambda: fleet.stored() == 60, 10), fleet.stored()
        assert fleet.seqs("dev-1") == list(range(60))
    finally:
        assert second.stop(timeout=10)


def _commit_fails_then_recovers(fleet: Fleet, svc: IngestService, source: MqttIngest, publish: Any) -> None:
    """Every insert fails (as on a full disk) while a message arrives: it is not acknowledged, the writer keeps
    it and retries, /healthz's source says since when; once inserts work again it is stored and acknowledged,
    on the same connection (no broker has to deliver it again)."""
    svc.writer.retries = 0
    with fleet.store.write() as c:
        c.execute("CREATE TRIGGER broken BEFORE INSERT ON summaries BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    publish("dev-1", fleet["dev-1"].message(range(5)))
    assert wait_until(lambda: svc.counters.snapshot()["write_errors"] >= 2, 10)  # retried, not given up
    assert svc.writer.failing_since is not None and "disk full" in (svc.writer.last_write_error or "")
    assert source.counters()["acked"] == 0 and fleet.stored() == 0
    with fleet.store.write() as c:
        c.execute("DROP TRIGGER broken")
    assert wait_until(lambda: fleet.seqs("dev-1") == [0, 1, 2, 3, 4], 15), fleet.seqs("dev-1")
    assert wait_until(lambda: source.counters()["acked"] == 1, 5)
    assert source.counters()["connects"] == 1 and svc.writer.failing_since is None


def test_a_message_whose_commit_fails_is_not_acknowledged_and_is_stored_once_the_store_works_again(
        running: Running, publisher: Publisher) -> None:
    fleet, svc, source = running

    def publish(device: str, payload: bytes) -> None:
        publisher.send(device, payload)
        publisher.wait()

    _commit_fails_then_recovers(fleet, svc, source, publish)


def test_with_the_embedded_broker_a_failed_commit_loses_nothing(make_fleet: FleetFactory) -> None:
    """The audit's loss: the embedded amqtt broker does not deliver unacknowledged messages again after the
    subscriber reconnects, so giving a failed batch up (and reconnecting) lost it; it is kept and retried."""
    broker = EmbeddedBroker("127.0.0.1", 0).start()
    try:
        fleet = make_fleet(broker=f"mqtt://127.0.0.1:{broker.port}")
        svc = IngestService(fleet.settings, fleet.store)
        source = mqtt_source(fleet.settings, svc, backoff_initial=0.05, backoff_max=0.5)
        assert svc.start(timeout=10), source.last_error
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="pub-embedded", protocol=mqtt.MQTTv311)
        pub.connect("127.0.0.1", broker.port)
        pub.loop_start()

        def publish(device: str, payload: bytes) -> None:
            info = pub.publish(topic(FLEET, device, "summary"), payload, qos=1)
            info.wait_for_publish(10)
            assert info.is_published()

        try:
            _commit_fails_then_recovers(fleet, svc, source, publish)
        finally:
            pub.disconnect()
            pub.loop_stop()
            assert svc.stop(timeout=10)
    finally:
        broker.stop()


def test_the_subscriber_reconnects_after_a_broker_restart(make_fleet: FleetFactory, tmp_path: Path) -> None:
    with Mosquitto(tmp_path / "persistent", persistence=True) as broker:
        fleet = make_fleet(broker=broker.url)
        svc = IngestService(fleet.settings, fleet.store)
        source = mqtt_source(fleet.settings, svc, backoff_initial=0.05, backoff_max=0.3)
        assert svc.start(timeout=10)
        pub = Publisher(broker)
        try:
            pub.send("dev-1", fleet["dev-1"].message(range(10)))
            pub.wait()
            assert wait_until(lambda: fleet.stored() == 10, 10)
            pub.close()
            broker.restart()  # same port; the broker saved the server's session
            pub = Publisher(broker)
            pub.send("dev-1", fleet["dev-1"].message(range(10, 20)))
            pub.wait()
            assert wait_until(lambda: fleet.seqs("dev-1") == list(range(20)), 15), fleet.seqs("dev-1")
            assert source.counters()["connects"] >= 2
        finally:
            pub.close()
            assert svc.stop(timeout=10)


def test_a_real_device_link_delivers_summaries_report_and_heartbeats(
        running: Running, mosquitto: Mosquitto, tmp_path: Path) -> None:
    from device_agent.config import DeviceConfig, DeviceDir
    from device_agent.link import MqttLink
    from device_agent.outbox import Outbox

    fleet, svc, source = running
    dev = fleet["dev-1"]
    (tmp_path / "device").mkdir()
    device_dir = DeviceDir(tmp_path / "device")
    outbox = Outbox(device_dir.outbox, max_rows=10_000)
    cfg = DeviceConfig(device_id="dev-1", target="x86_64-avx2", fleet=FLEET, broker=mosquitto.url,
                       heartbeat_seconds=0.2)
    for seq in range(1, 121):
        with outbox.transaction() as tx:
            tx.put_summary(make_summary(seq, "dev-1"))
    at = datetime.now(UTC).replace(microsecond=0)
    with outbox.transaction() as tx:
        tx.put_report(Report("dev-1", fmt(at), {"name": "clinical", "version": "1.0.0"}, None, "idle",
                             None).to_dict())
    link = MqttLink(cfg, device_dir, outbox, lambda doc: sign_envelope(doc, dev.key), backoff_initial=0.05,
                    backoff_max=0.2)
    link.start()
    try:
        assert wait_until(lambda: fleet.stored() == 120 and outbox.depth() == 0, 15), fleet.stored()
        assert wait_until(lambda: svc.counters.snapshot()["received"]["heartbeat"] >= 1, 5)
        assert wait_until(lambda: svc.counters.snapshot()["reports_stored"] == 1, 5)
    finally:
        assert link.stop(timeout=10)
        outbox.close()
    row = fleet.store.one("SELECT reported, last_seen FROM devices WHERE device_id = 'dev-1'")
    assert row is not None and json.loads(row["reported"])["at"] == fmt(at) and row["last_seen"] is not None
    assert fleet.seqs("dev-1") == list(range(1, 121)) and fleet.quarantined() == []


# ---- crash -----------------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class ServerProcess:
    """``python -m tests.fleet_server.ingest_server`` in its own process group; stopped by its PID."""

    def __init__(self, fleet: Fleet, broker: Mosquitto, log: Path) -> None:
        self.log = log
        with log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tests.fleet_server.ingest_server", "--data", str(fleet.settings.data_dir),
                 "--broker", broker.url, "--fleet", FLEET], cwd=ROOT, stdout=subprocess.PIPE, stderr=fh,
                stdin=subprocess.DEVNULL, start_new_session=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.decode().strip())

    def wait_ready(self, timeout: float = 20.0) -> list[int]:
        """Wait until subscribed; returns the PIDs of its validator processes."""
        def ready() -> bool:
            return any(line.startswith('{"ready"') for line in self.lines) or self.proc.poll() is not None

        assert wait_until(ready, timeout) and self.proc.poll() is None, \
            f"server did not start: {self.lines} {self.log.read_text()[-2000:]}"
        self.workers = list(json.loads(next(x for x in self.lines if x.startswith('{"ready"')))["workers"])
        return self.workers

    def kill(self) -> None:
        """SIGKILL the server process (by PID); its validator processes must then exit by themselves."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        orphans_gone = wait_until(lambda: not any(_alive(p) for p in getattr(self, "workers", [])), 5)
        for pid in getattr(self, "workers", []):  # never leave one behind, even when the check fails
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        assert orphans_gone, "validator processes outlived the SIGKILLed server"


    def terminate(self, timeout: float = 20.0) -> dict[str, Any]:
        os.kill(self.proc.pid, signal.SIGTERM)
        assert self.proc.wait(timeout=timeout) == 0, self.log.read_text()[-2000:]
        self._reader.join(5)
        return dict(json.loads(self.lines[-1]))


def test_sigkill_mid_stream_loses_nothing_and_stores_nothing_twice(
        make_fleet: FleetFactory, mosquitto: Mosquitto, publisher: Publisher, tmp_path: Path) -> None:
    fleet = make_fleet(broker=mosquitto.url)
    n_messages, per_message = 300, 10  # 3000 summaries, two devices
    payloads = [(dev, fleet[dev].message(range(i * per_message, (i + 1) * per_message)))
                for i in range(n_messages // 2) for dev in ("dev-1", "dev-2")]
    total = n_messages * per_message
    servers = [ServerProcess(fleet, mosquitto, tmp_path / "server1.log")]
    try:
        assert len(servers[0].wait_ready()) == 2  # validation in two worker processes, as deployed
        sent = threading.Event()

        def publish_all() -> None:
            for k, (dev, payload) in enumerate(payloads):
                publisher.send(dev, payload)
                if k % 10 == 9:
                    time.sleep(0.02)  # a stream, not one burst: the kill lands in the middle of it
            sent.set()

        feeder = threading.Thread(target=publish_all, daemon=True)
        feeder.start()
        assert wait_until(lambda: fleet.stored() >= total // 4, 20), fleet.stored()
        servers[0].kill()  # SIGKILL: no flush, no acknowledgements for what was in flight
        killed_at = fleet.stored()
        assert killed_at < total, "the stream was over before the kill; the test proves nothing"
        feeder.join(30)
        assert sent.is_set()
        publisher.wait(20)  # the broker holds everything for the server's persistent session

        servers.append(ServerProcess(fleet, mosquitto, tmp_path / "server2.log"))
        servers[1].wait_ready()
        assert wait_until(lambda: fleet.stored() >= total, 30), f"{fleet.stored()} of {total} after restart"
        time.sleep(0.3)  # a late duplicate would land now
        counters = servers[1].terminate()
    finally:
        for s in servers:
            s.kill()
    rows = fleet.store.query("SELECT device_id, seq, COUNT(*) AS n FROM summaries GROUP BY device_id, seq")
    assert len(rows) == total and all(r["n"] == 1 for r in rows)
    for dev in ("dev-1", "dev-2"):
        assert fleet.seqs(dev) == list(range(total // 2))
    assert fleet.quarantined() == []
    assert counters["clean"] and counters["write_errors"] == 0
    assert counters["stored"] + killed_at == total  # the restarted server stored exactly what was missing
