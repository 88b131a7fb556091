"""The MQTT link against a real Mosquitto: exactly-once delivery in order across outages, acknowledgement
before deletion, signed envelopes, retained report, heartbeats, desired state, link.json."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from device_agent.config import DeviceConfig, DeviceDir
from device_agent.link import OFFLINE, InFlight, LinkConfigError, MqttLink, link_state_for
from device_agent.outbox import Outbox
from edgefleet_contracts.signing import Ed25519PrivateKey, key_id, sign_envelope, verify_envelope
from edgefleet_contracts.summary import Summary
from edgefleet_contracts.topics import topic
from tests.brokers import Mosquitto, Received, SilentBroker, Subscriber, make_tls_files
from tests.device_agent.conftest import SummaryFactory
from tests.support import wait_until

FLEET, DEVICE = "fleet-a", "dev-1"
SUMMARY_TOPIC = topic(FLEET, DEVICE, "summary")
REPORT_TOPIC = topic(FLEET, DEVICE, "report")
HEARTBEAT_TOPIC = topic(FLEET, DEVICE, "heartbeat")
DESIRED_TOPIC = topic(FLEET, DEVICE, "desired")


def config(broker: str, **kw: Any) -> DeviceConfig:
    return DeviceConfig(device_id=DEVICE, target="x86_64-avx2", fleet=FLEET, broker=broker, **kw)


def envelopes(messages: list[Received]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in messages:
        if m.topic == SUMMARY_TOPIC:
            batch = json.loads(m.payload)
            assert isinstance(batch, list) and 1 <= len(batch) <= 50
            out.extend(batch)
    return out


def seqs(messages: list[Received]) -> list[int]:
    return [e["signed"]["seq"] for e in envelopes(messages)]


def link_json(device_dir: DeviceDir) -> dict[str, Any]:
    try:
        doc: dict[str, Any] = json.loads((device_dir.path / "link.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc


@pytest.fixture
def device_dir(tmp_path: Path) -> DeviceDir:
    (tmp_path / "device").mkdir()
    return DeviceDir(tmp_path / "device")


@pytest.fixture
def outbox(device_dir: DeviceDir) -> Iterator[Outbox]:
    ob = Outbox(device_dir.outbox, max_rows=10_000)
    yield ob
    ob.close()


LinkFactory = Callable[..., MqttLink]


@pytest.fixture
def make_link(device_dir: DeviceDir, outbox: Outbox, device_key: Ed25519PrivateKey) -> Iterator[LinkFactory]:
    """``make_link(cfg, **options)``: a link with fast backoff, stopped (bounded) after the test."""
    made: list[MqttLink] = []

    def make(cfg: DeviceConfig, **kw: Any) -> MqttLink:
        kw.setdefault("backoff_initial", 0.05)
        kw.setdefault("backoff_max", 0.2)
        link = MqttLink(cfg, device_dir, outbox, lambda doc: sign_envelope(doc, device_key), **kw)
        made.append(link)
        return link

    yield make
    for link in made:
        assert link.stop(timeout=10)


def enqueue(outbox: Outbox, make_summary: SummaryFactory, seq_range: range) -> None:
    for seq in seq_range:  # one transaction per window, as the agent does
        with outbox.transaction() as tx:
            tx.put_summary(make_summary(seq, device_id=DEVICE))
            tx.set_meta("seq", str(seq))


# ---- delivery ------------------------------------------------------------------------------------------
def test_queued_summaries_are_delivered_once_in_order_signed_and_then_deleted(
        mosquitto: Mosquitto, outbox: Outbox, make_link: LinkFactory, make_summary: SummaryFactory,
        device_key: Ed25519PrivateKey) -> None:
    enqueue(outbox, make_summary, range(1, 201))
    with Subscriber(mosquitto, [SUMMARY_TOPIC]) as sub:
        link = make_link(config(mosquitto.url))
        link.start()
        assert sub.wait_for(lambda ms: len(seqs(ms)) >= 200, timeout=15), f"got {len(seqs(sub.messages()))}"
        assert wait_until(lambda: outbox.depth() == 0, timeout=5)
        time.sleep(0.2)  # a duplicate would arrive now
        messages = sub.messages(SUMMARY_TOPIC)

    assert seqs(messages) == list(range(1, 201))
    assert len(messages) == 4  # batches of 50 envelopes, one message each
    assert all(m.qos == 1 and not m.retain for m in messages)
    trusted = {key_id(device_key.public_key()): device_key.public_key()}
    for env in envelopes(messages):
        signed, _ = verify_envelope(env, trusted, "summary")
        assert Summary.from_dict(signed) == make_summary(signed["seq"], device_id=DEVICE)
    counters = link.counters()
    assert counters["sent"] == counters["acked"] == 200
    assert counters["messages_sent"] == counters["messages_acked"] == 4
    assert counters["publish_errors"] == 0
    assert link.state == "connected"
    assert link_json(link.device_dir)["state"] == "connected"


def test_a_broker_outage_loses_nothing_and_duplicates_nothing(
        tmp_path: Path, outbox: Outbox, device_dir: DeviceDir, make_link: LinkFactory,
        make_summary: SummaryFactory, caplog: pytest.LogCaptureFixture) -> None:
    # Persistence on, subscriber with a persistent session: what is published while it reconnects is kept.
    caplog.set_level(logging.WARNING, logger="device_agent.link")
    with Mosquitto(tmp_path / "broker", persistence=True) as broker:
        sub = Subscriber(broker, [SUMMARY_TOPIC], client_id="collector", clean_session=False).start()
        try:
            enqueue(outbox, make_summary, range(1, 201))
            link = make_link(config(broker.url))
            link.start()
            assert sub.wait_for(lambda ms: len(seqs(ms)) >= 200, timeout=15)
            assert wait_until(lambda: outbox.depth() == 0, timeout=5)
            time.sleep(0.2)  # let the collector's acknowledgements reach the broker

            broker.stop()
            assert wait_until(lambda: link_json(device_dir).get("state") == "disconnected", timeout=5)
            assert link.state == "disconnected"
            enqueue(outbox, make_summary, range(201, 301))
            time.sleep(0.5)  # several reconnect attempts against a closed port
            assert outbox.depth() == 100
            assert link_json(device_dir)["state"] == "disconnected"
            assert "refused" in (link_json(device_dir)["last_error"] or "").lower()

            broker.start()  # same port
            assert sub.wait_for(lambda ms: len(seqs(ms)) >= 300, timeout=15), f"got {len(seqs(sub.messages()))}"
            assert wait_until(lambda: outbox.depth() == 0, timeout=5)
            time.sleep(0.2)
            assert seqs(sub.messages()) == list(range(1, 301))
            assert link.counters()["reconnects"] == 1
            assert link_json(device_dir)["state"] == "connected"
            # the outage and its end at WARNING, once each, whatever the retries in between (the default log level
            # of `device-agent run` showed nothing of a days-long outage)
            said = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert [m.split(" is ")[1][:4] for m in said if "mqtt link to" in m] == ["down", "back"], said
        finally:
            sub.stop()


def test_the_report_is_retained_signed_and_only_the_latest_is_sent(
        mosquitto: Mosquitto, outbox: Outbox, make_link: LinkFactory, device_key: Ed25519PrivateKey) -> None:
    with outbox.transaction() as tx:
        tx.put_report({"device_id": DEVICE, "active": "clinical 1.0.0"})
    with outbox.transaction() as tx:
        tx.put_report({"device_id": DEVICE, "active": "clinical 1.1.0"})
    link = make_link(config(mosquitto.url))
    link.start()
    assert wait_until(lambda: outbox.depth() == 0, timeout=10)

    with Subscriber(mosquitto, [REPORT_TOPIC]) as late:  # subscribes after the report was published
        assert late.wait_for(lambda ms: len(ms) >= 1, timeout=5)
        time.sleep(0.1)
        got = late.messages()
    assert len(got) == 1 and got[0].retain and got[0].qos == 1
    trusted = {key_id(device_key.public_key()): device_key.public_key()}
    signed, _ = verify_envelope(json.loads(got[0].payload), trusted, "report")
    assert signed == {"device_id": DEVICE, "active": "clinical 1.1.0"}
    assert link.counters()["messages_acked"] == 1


def test_rows_stay_queued_while_no_broker_answers(
        mosquitto: Mosquitto, outbox: Outbox, device_dir: DeviceDir, make_link: LinkFactory,
        make_summary: SummaryFactory) -> None:
    url = mosquitto.url
    mosquitto.stop()
    enqueue(outbox, make_summary, range(1, 6))
    link = make_link(config(url))
    link.start()
    assert wait_until(lambda: link_json(device_dir).get("state") == "disconnected", timeout=5)
    time.sleep(0.5)
    assert outbox.depth() == 5
    assert link.counters()["sent"] == 0
    assert url in (link.last_error or "")
    started = time.monotonic()
    assert link.stop(timeout=5)
    assert time.monotonic() - started < 2  # stop interrupts the backoff wait
    assert link_json(device_dir)["state"] == "disconnected"


def test_a_broker_that_never_acknowledges_deletes_nothing_and_bounds_messages_in_flight(
        outbox: Outbox, make_link: LinkFactory, make_summary: SummaryFactory) -> None:
    enqueue(outbox, make_summary, range(1, 31))
    with SilentBroker() as silent:
        link = make_link(config(silent.url), batch_size=2, max_inflight=3)
        link.start()
        assert silent.wait_for(lambda ps: len([p for p in ps if p.topic == SUMMARY_TOPIC]) >= 3, timeout=5)
        time.sleep(0.5)
        sent = [p for p in silent.publishes() if p.topic == SUMMARY_TOPIC]
        # exactly max_inflight messages of batch_size rows each, and nothing deleted without a PUBACK
        assert [[e["signed"]["seq"] for e in json.loads(p.payload)] for p in sent] == [[1, 2], [3, 4], [5, 6]]
        assert all(p.qos == 1 for p in sent)
        assert outbox.depth() == 30
        assert link.counters()["acked"] == 0 and link.counters()["sent"] == 6
        assert link.counters()["publish_errors"] == 0  # bounded by the link, not by paho refusing (rc=15)

        # the connection drops: in-flight ids are forgotten, the same rows go again from the outbox
        silent.drop_client()
        assert silent.wait_for(
            lambda ps: len([p for p in ps if p.topic == SUMMARY_TOPIC and p.connection == 2]) >= 3, timeout=5)
        again = [p for p in silent.publishes() if p.topic == SUMMARY_TOPIC and p.connection == 2]
        assert [[e["signed"]["seq"] for e in json.loads(p.payload)] for p in again[:3]] == [[1, 2], [3, 4], [5, 6]]
        assert outbox.depth() == 30
        assert link.counters()["reconnects"] == 1


def test_heartbeats_carry_device_time_and_outbox_depth(
        mosquitto: Mosquitto, outbox: Outbox, make_link: LinkFactory, make_summary: SummaryFactory) -> None:
    with Subscriber(mosquitto, [HEARTBEAT_TOPIC]) as sub:
        link = make_link(config(mosquitto.url, heartbeat_seconds=0.2))
        link.start()
        assert sub.wait_for(lambda ms: len(ms) >= 3, timeout=5)
    beats = [json.loads(m.payload) for m in sub.messages()]
    assert set(beats[0]) == {"device_id", "at", "outbox_depth"}
    assert beats[0]["device_id"] == DEVICE and beats[0]["outbox_depth"] == 0
    assert beats[0]["at"].endswith("Z")
    assert all(m.qos == 0 for m in sub.messages())


def test_desired_state_reaches_the_callback_and_its_exceptions_do_not_kill_the_link(
        mosquitto: Mosquitto, outbox: Outbox, make_link: LinkFactory, make_summary: SummaryFactory) -> None:
    got: list[bytes] = []

    def on_desired(payload: bytes) -> None:
        got.append(payload)
        if payload == b"bad":
            raise ValueError("not a desired-state document")

    link = make_link(config(mosquitto.url), on_desired=on_desired)
    link.start()
    assert wait_until(lambda: link.counters()["subscribed"] == 1, timeout=5)  # SUBACK for the desired topic
    with Subscriber(mosquitto, []) as pub:
        pub.client.publish(DESIRED_TOPIC, b"bad", qos=1).wait_for_publish(5)
        pub.client.publish(DESIRED_TOPIC, b'{"version": 2}', qos=1, retain=True).wait_for_publish(5)
    assert wait_until(lambda: len(got) == 2, timeout=5)
    assert got == [b"bad", b'{"version": 2}']
    assert link.counters()["desired_errors"] == 1
    # still alive: it delivers what is queued next
    enqueue(outbox, make_summary, range(1, 4))
    assert wait_until(lambda: outbox.depth() == 0, timeout=5)
    assert link.state == "connected"


def test_link_json_follows_the_state(
        mosquitto: Mosquitto, device_dir: DeviceDir, make_link: LinkFactory) -> None:
    link = make_link(config(mosquitto.url))
    link.start()
    assert wait_until(lambda: link_json(device_dir).get("state") == "connected", timeout=5)
    doc = link_json(device_dir)
    assert doc["last_error"] is None and doc["since"].endswith("Z")
    assert link_state_for(link.cfg, device_dir).startswith("connected since")
    assert link.stop(timeout=5)
    assert link_json(device_dir)["state"] == "disconnected"


# ---- credentials ---------------------------------------------------------------------------------------
def test_username_and_password_file_authenticate(
        tmp_path: Path, outbox: Outbox, make_link: LinkFactory, make_summary: SummaryFactory) -> None:
    secret = tmp_path / "mqtt.pw"
    secret.write_text("s3cret-pw\n")
    secret.chmod(0o600)
    with Mosquitto(tmp_path / "broker", users={DEVICE: "s3cret-pw"}) as broker:
        enqueue(outbox, make_summary, range(1, 4))
        link = make_link(config(broker.url, mqtt_username=DEVICE, mqtt_password_file=str(secret)))
        link.start()
        assert wait_until(lambda: outbox.depth() == 0, timeout=5)


def test_a_wrong_password_is_reported_and_retried(
        tmp_path: Path, outbox: Outbox, device_dir: DeviceDir, make_link: LinkFactory,
        make_summary: SummaryFactory) -> None:
    secret = tmp_path / "mqtt.pw"
    secret.write_text("wrong")
    secret.chmod(0o600)
    with Mosquitto(tmp_path / "broker", users={DEVICE: "right"}) as broker:
        enqueue(outbox, make_summary, range(1, 4))
        link = make_link(config(broker.url, mqtt_username=DEVICE, mqtt_password_file=str(secret)))
        link.start()
        assert wait_until(lambda: "refused" in (link_json(device_dir).get("last_error") or ""), timeout=5)
        assert "not authori" in link_json(device_dir)["last_error"].lower()
        time.sleep(0.3)
        assert outbox.depth() == 3 and link.state != "connected"


def test_mqtts_verifies_the_broker_against_the_configured_ca(
        tmp_path: Path, outbox: Outbox, device_dir: DeviceDir, make_link: LinkFactory,
        make_summary: SummaryFactory) -> None:
    tls = make_tls_files(tmp_path / "tls")
    stranger = make_tls_files(tmp_path / "other-ca", name="other-ca")
    with Mosquitto(tmp_path / "broker", tls=tls) as broker:
        assert broker.url.startswith("mqtts://127.0.0.1:")
        enqueue(outbox, make_summary, range(1, 4))
        wrong = make_link(config(broker.url, mqtt_tls_ca=str(stranger.ca_cert)))
        wrong.start()
        assert wait_until(lambda: "certificate" in (link_json(device_dir).get("last_error") or ""), timeout=5)
        assert wrong.stop(timeout=5)
        assert outbox.depth() == 3

        right = make_link(config(broker.url, mqtt_tls_ca=str(tls.ca_cert)))
        right.start()
        assert wait_until(lambda: outbox.depth() == 0, timeout=5)
        assert right.state == "connected"


def test_a_password_file_readable_by_others_is_refused_at_start(
        tmp_path: Path, make_link: LinkFactory) -> None:
    secret = tmp_path / "mqtt.pw"
    secret.write_text("s3cret")
    secret.chmod(0o644)
    link = make_link(config("mqtt://127.0.0.1:1", mqtt_username=DEVICE, mqtt_password_file=str(secret)))
    with pytest.raises(LinkConfigError, match="chmod 600"):
        link.start()
    assert not link.running


def test_no_broker_means_offline_and_no_link(device_dir: DeviceDir, outbox: Outbox) -> None:
    cfg = config("")
    assert link_state_for(cfg) == OFFLINE
    with pytest.raises(LinkConfigError, match="offline"):
        MqttLink(cfg, device_dir, outbox, lambda doc: doc)


# ---- bookkeeping (pure) --------------------------------------------------------------------------------
def test_in_flight_maps_message_ids_to_rows_and_forgets_them_on_reset() -> None:
    book = InFlight(limit=2)
    book.add(7, [1, 2, 3])
    assert book.room() == 1 and book.last_row_id == 3
    with pytest.raises(ValueError, match="already in flight"):
        book.add(7, [4])
    book.add(8, [4])
    assert book.room() == 0
    with pytest.raises(ValueError, match="in flight"):
        book.add(9, [5])
    assert book.ack(8) == (4,)
    assert book.ack(8) == ()  # a second PUBACK, or a heartbeat's mid: nothing to delete
    assert book.ack(12345) == ()
    book.reset()
    assert len(book) == 0 and book.room() == 2 and book.last_row_id == 0
    assert book.ack(7) == ()  # a PUBACK from before the reset deletes nothing
