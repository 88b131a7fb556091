"""``_IngestClient``'s fast read of QoS 1 PUBLISH packets: every packet reaches ingest whole and in order, the
fast read takes the plain QoS 1 ones, and everything else (other QoS, retained, other packet types, a packet
split across reads, malformed packets) is left to paho, which judges it as it always did."""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from fleet_server.mqtt_ingest import _READ_BYTES, _IngestClient


def _length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 127
        out.append(digit | (128 if n else 0))
        if not n:
            return bytes(out)


def publish(topic: bytes, payload: bytes, *, mid: int = 1, first: int = 0x32) -> bytes:
    qos = (first >> 1) & 3
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", mid) if qos else b"") + payload
    return bytes([first]) + _length(len(body)) + body


class Reader:
    """An _IngestClient reading from one end of a socket pair; records what it hands on, and how."""

    def __init__(self) -> None:
        self.got: list[tuple[str, bytes, int, bytes]] = []
        self.client = _IngestClient(CallbackAPIVersion.VERSION2, client_id="t", protocol=mqtt.MQTTv311,
                                    manual_ack=True)

        def on_message(c: Any, userdata: Any, m: mqtt.MQTTMessage) -> None:
            self.got.append(("paho", m._topic, m.mid, bytes(m.payload)))

        self.client.on_message = on_message
        self.client.publish_fast = lambda t, mid, p: self.got.append(("fast", t, mid, p))
        self.sock, self.peer = socket.socketpair()
        self.sock.setblocking(False)  # as paho leaves a connected socket
        self.client._sock = self.sock

    def feed(self, data: bytes) -> threading.Thread:
        t = threading.Thread(target=self.peer.sendall, args=(data,), daemon=True)
        t.start()
        return t

    def read(self, n: int, timeout: float = 10.0) -> MQTTErrorCode:
        deadline = time.monotonic() + timeout
        while len(self.got) < n:
            rc = self.client.loop_read()
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return rc
            assert time.monotonic() < deadline, f"only {len(self.got)} of {n} messages in {timeout} s"
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def close(self) -> None:
        self.sock.close()
        self.peer.close()


@pytest.fixture
def reader() -> Any:
    r = Reader()
    yield r
    r.close()


def test_plain_qos1_publishes_are_taken_whole_and_in_order_by_the_fast_read(reader: Reader) -> None:
    packets = [(b"edgefleet/f/dev-%d/summary" % i, b'[{"n":%d}]' % i, i + 1) for i in range(200)]
    reader.feed(b"".join(publish(t, p, mid=m) for t, p, m in packets)).join(5)
    assert reader.read(200) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert reader.got == [("fast", t, m, p) for t, p, m in packets]
    assert reader.client.fast_publishes == 200


def test_other_packets_go_to_paho_in_their_place(reader: Reader) -> None:
    topic = b"edgefleet/f/dev-1/summary"
    wire = [
        publish(topic, b"a", mid=1),
        publish(topic, b"b", mid=2, first=0x3A),  # DUP: still a plain QoS 1 delivery
        publish(topic, b"c", first=0x30),  # QoS 0
        publish(topic, b"d", mid=4, first=0x33),  # retained
        bytes([0xD0, 0x00]),  # PINGRESP between publishes
        publish(topic, b"e" * 200, mid=5),  # a two-byte remaining length
        publish(b"edgefleet/f/\xff/summary", b"f", mid=6),  # not UTF-8: handed on as bytes; ingest refuses it
    ]
    reader.feed(b"".join(wire)).join(5)
    assert reader.read(6) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert reader.got == [("fast", topic, 1, b"a"), ("fast", topic, 2, b"b"), ("paho", topic, 0, b"c"),
                          ("paho", topic, 4, b"d"), ("fast", topic, 5, b"e" * 200),
                          ("fast", b"edgefleet/f/\xff/summary", 6, b"f")]


def test_a_packet_split_across_reads_is_completed_by_paho(reader: Reader) -> None:
    topic = b"edgefleet/f/dev-1/summary"
    big = bytes(range(256)) * ((_READ_BYTES * 3) // 256)  # three reads' worth: never whole in one buffer
    wire = publish(topic, b"x" * 100, mid=1) + publish(topic, big, mid=2) + publish(topic, b"y", mid=3)
    sender = reader.feed(wire)
    assert reader.read(3) == MQTTErrorCode.MQTT_ERR_SUCCESS
    sender.join(5)
    assert [(how, mid, len(p)) for how, _, mid, p in reader.got][1] == ("paho", 2, len(big))
    assert reader.got[1][3] == big and reader.got[0][3] == b"x" * 100 and reader.got[2][3] == b"y"


def test_a_packet_cut_in_the_middle_of_its_length_is_completed(reader: Reader) -> None:
    topic = b"edgefleet/f/dev-1/summary"
    wire = publish(topic, b"z" * 300, mid=7)
    reader.peer.sendall(wire[:2])  # the command byte and the first of two length bytes
    assert reader.client.loop_read() == MQTTErrorCode.MQTT_ERR_SUCCESS and reader.got == []
    reader.peer.sendall(wire[2:])
    assert reader.read(1) == MQTTErrorCode.MQTT_ERR_SUCCESS
    assert reader.got == [("paho", topic, 7, b"z" * 300)]


@pytest.mark.parametrize("wire", [
    bytes([0x32, 0xFF, 0xFF, 0xFF, 0xFF, 0x7F]),  # a remaining length of five bytes
    bytes([0x32, 0x05, 0x00, 0x00, 0x00, 0x01, 0x61]),  # an empty topic
], ids=["length-too-long", "empty-topic"])
def test_malformed_packets_are_judged_by_paho(reader: Reader, wire: bytes) -> None:
    reader.feed(wire + publish(b"t", b"after", mid=9)).join(5)
    assert reader.read(1) == MQTTErrorCode.MQTT_ERR_PROTOCOL
    assert reader.got == [] and reader.client.fast_publishes == 0
