"""Summary attacks against a real fleet server process ingesting from a real Mosquitto (and its HTTP ingest).

Each attack is published for real (paho, QoS 1, on the device topic) or POSTed, and must be rejected with its
reason, counted (``edgefleet_ingest_rejected_total{reason}``) and quarantined (listed by the API), the server
must stay up, and a good summary sent afterwards must be stored. Issue 8's list: device A publishing as B;
a replayed sequence; malformed JSON; deep nesting (100,000 nested arrays, and objects); NaN / Infinity; wrong
types; future timestamps; a 10 MB payload. (The per-device flood limit is tested with the rate limiter.)
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edgefleet_contracts.signing import generate_key, sign_envelope
from edgefleet_contracts.topics import topic
from tests.brokers import Mosquitto
from tests.fleet_server.conftest import make_summary

from .server_proc import FLEET, ServerProcess, wait_until

SEQ = itertools.count(1000)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, built: Any) -> Iterator[ServerProcess]:
    folder = tmp_path_factory.mktemp("summary-attacks")
    broker = Mosquitto(folder / "mosquitto").start()
    server = ServerProcess.create(folder, broker, built).start()
    try:
        yield server
    finally:
        server.stop()
        broker.close()


class Publisher:
    def __init__(self, broker: Mosquitto) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"attacker-{next(SEQ)}",
                                  protocol=mqtt.MQTTv311)
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()

    def send(self, device: str, payload: bytes) -> None:
        info = self.client.publish(topic(FLEET, device, "summary"), payload, qos=1)
        assert info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS, mqtt.error_string(info.rc)
        info.wait_for_publish(30)
        assert info.is_published()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def publisher(stack: ServerProcess) -> Iterator[Publisher]:
    p = Publisher(stack.broker)
    yield p
    p.close()


# ---- building messages ----------------------------------------------------------------------------------
def env(s: ServerProcess, signer: str, seq: int, claims: str | None = None, **kw: Any) -> dict[str, Any]:
    """A summary claiming device ``claims`` (default: the signer), signed by ``signer``'s real key."""
    return sign_envelope(make_summary(seq, claims or signer, **kw).to_dict(), s.keys[signer])


def msg(*envs: dict[str, Any]) -> bytes:
    return json.dumps(list(envs), separators=(",", ":")).encode()


def _resigned(s: ServerProcess, seq: int, change: Callable[[dict[str, Any]], None]) -> bytes:
    doc = make_summary(seq, "dev-a").to_dict()
    change(doc)
    return msg(sign_envelope(doc, s.keys["dev-a"]))


def _constant(s: ServerProcess, seq: int, word: bytes) -> bytes:
    m = msg(env(s, "dev-a", seq))
    assert b'"sum":10.0' in m
    return m.replace(b'"sum":10.0', b'"sum":' + word, 1)


def _future(s: ServerProcess, seq: int) -> bytes:
    return msg(env(s, "dev-a", seq, start=datetime.now(UTC).replace(microsecond=0) + timedelta(hours=1)))


def _unsigned(s: ServerProcess, seq: int) -> bytes:
    e = env(s, "dev-a", seq)
    e["signatures"] = []
    return msg(e)


Build = Callable[[ServerProcess, int], bytes]
# name: (topic device, message, reason)
ATTACKS: dict[str, tuple[str, Build, str]] = {
    "A publishes its own summary on B's topic": ("dev-b", lambda s, n: msg(env(s, "dev-a", n)), "topic_mismatch"),
    "A signs a summary claiming to be B, on B's topic": ("dev-b", lambda s, n: msg(env(s, "dev-a", n, "dev-b")),
                                                         "bad_signature"),
    "A sends B's name on its own topic": ("dev-a", lambda s, n: msg(env(s, "dev-a", n, "dev-b")), "topic_mismatch"),
    "a summary signed by no enrolled key": ("dev-a", lambda s, n: msg(sign_envelope(
        make_summary(n, "dev-a").to_dict(), generate_key())), "bad_signature"),
    "unsigned": ("dev-a", _unsigned, "bad_signature"),
    "malformed JSON": ("dev-a", lambda s, n: b'[{"signed": {"device_id": "dev-a",', "malformed_json"),
    "not UTF-8": ("dev-a", lambda s, n: b'["\xff\xfe\xfd"]', "malformed_json"),
    "100,000 nested arrays": ("dev-a", lambda s, n: b"[" * 100_000 + b"]" * 100_000, "malformed_json"),
    "100,000 nested objects": ("dev-a", lambda s, n: b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "malformed_json"),
    "NaN": ("dev-a", lambda s, n: _constant(s, n, b"NaN"), "malformed_json"),
    "Infinity": ("dev-a", lambda s, n: _constant(s, n, b"Infinity"), "malformed_json"),
    "-Infinity": ("dev-a", lambda s, n: _constant(s, n, b"-Infinity"), "malformed_json"),
    "wrong type: seq a string": ("dev-a", lambda s, n: _resigned(s, n, lambda d: d.update(seq=str(n))), "schema"),
    "wrong type: counts of strings": ("dev-a", lambda s, n: _resigned(
        s, n, lambda d: d["features"][0].update(counts=["1"] * len(d["features"][0]["counts"]))), "schema"),
    "wrong type: window a list": ("dev-a", lambda s, n: _resigned(s, n, lambda d: d.update(window=[1, 2])),
                                  "schema"),
    "a huge integer": ("dev-a", lambda s, n: _resigned(s, n, lambda d: d.update(seq=10 ** 40)), "schema"),
    "future timestamp": ("dev-a", _future, "future_timestamp"),
    "unknown device": ("dev-a", lambda s, n: msg(env(s, "dev-a", n)).replace(b'"dev-a"', b'"dev-z"'),
                       "unknown_device"),
    "10 MB payload": ("dev-a", lambda s, n: b'["' + b"x" * (10 * 1024 * 1024) + b'"]', "too_large"),
}
TOPIC_ONLY = {"A publishes its own summary on B's topic", "A sends B's name on its own topic"}
HTTP_STATUS = {"too_large": 413}


def _then_good_is_stored(s: ServerProcess, send: Callable[[bytes], None]) -> None:
    good = next(SEQ)
    send(msg(env(s, "dev-a", good)))
    assert wait_until(lambda: good in s.seqs("dev-a"), 20), f"good summary {good} not stored"


def _quarantined(s: ServerProcess, reason: str, source: str, rows_before: int) -> dict[str, Any]:
    rows = s.quarantine()
    assert len(rows) == rows_before + 1, rows[:3]
    newest = rows[0]
    assert (newest["reason"], newest["source"]) == (reason, source)
    assert newest["detail"] and newest["payload_bytes"] <= 64 * 1024
    return newest


@pytest.mark.parametrize("case", list(ATTACKS))
def test_an_mqtt_summary_attack_is_rejected_counted_quarantined_and_ingest_goes_on(stack, publisher, case):
    device, build, reason = ATTACKS[case]
    counted, rows_before, stored = stack.rejected(reason), len(stack.quarantine()), stack.db(
        "SELECT COUNT(*) FROM summaries")[0][0]

    publisher.send(device, build(stack, next(SEQ)))

    assert wait_until(lambda: stack.rejected(reason) == counted + 1, 20), f"{reason} not counted"
    row = _quarantined(stack, reason, "mqtt", rows_before)
    assert row["device_id"] in (device, None)
    assert stack.db("SELECT COUNT(*) FROM summaries")[0][0] == stored  # nothing of it stored
    assert stack.alive()
    _then_good_is_stored(stack, lambda m: publisher.send("dev-a", m))


@pytest.mark.parametrize("case", [c for c in ATTACKS if c not in TOPIC_ONLY])
def test_an_http_summary_attack_gets_its_reason_and_status(stack, case):
    _, build, reason = ATTACKS[case]
    counted, rows_before = stack.rejected(reason), len(stack.quarantine())
    with stack.client() as c:  # devices post without a bearer token: they authenticate by signature
        r = c.post("/api/v1/summaries", content=build(stack, next(SEQ)), headers={"Content-Type": "application/json"})
        assert r.status_code == HTTP_STATUS.get(reason, 422), r.text
        assert [x["reason"] for x in r.json()["rejected"]] == [reason] and r.json()["accepted"] == 0
        assert stack.rejected(reason) == counted + 1
        _quarantined(stack, reason, "http", rows_before)
        assert stack.alive()
        _then_good_is_stored(stack, lambda m: c.post("/api/v1/summaries", content=m).raise_for_status())


def test_a_replayed_sequence_is_acknowledged_never_stored_twice_and_cannot_overwrite(stack, publisher):
    seq = next(SEQ)
    original = msg(env(stack, "dev-a", seq))
    publisher.send("dev-a", original)
    assert wait_until(lambda: seq in stack.seqs("dev-a"), 20)
    first = stack.body("dev-a", seq)
    dups = stack.metric("edgefleet_ingest_duplicates_total")
    rows_before = len(stack.quarantine())

    publisher.send("dev-a", original)  # the same bytes again
    altered = msg(env(stack, "dev-a", seq, count=999))  # same seq, other content, validly signed by dev-a
    publisher.send("dev-a", altered)
    with stack.client() as c:
        r = c.post("/api/v1/summaries", content=altered)
        assert r.status_code == 200 and r.json() == {"accepted": 0, "duplicates": 1, "rejected": []}

    assert wait_until(lambda: stack.metric("edgefleet_ingest_duplicates_total") == dups + 3, 20)
    assert stack.seqs("dev-a").count(seq) == 1 and stack.body("dev-a", seq) == first  # the first one stands
    assert len(stack.quarantine()) == rows_before  # a replay is not an error: counted as a duplicate
    _then_good_is_stored(stack, lambda m: publisher.send("dev-a", m))


def test_the_server_log_shows_no_crash(stack: ServerProcess) -> None:
    """Runs last in this module: nothing above made the server raise (RecursionError, MemoryError, ...)."""
    assert stack.alive()
    text = Path(stack.log).read_text(errors="replace")
    assert "Traceback" not in text and "RecursionError" not in text, text[-3000:]
