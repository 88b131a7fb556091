"""The MQTT side of ingest: a durable subscriber that acknowledges a message only after it is committed.

One thread owns one paho client (MQTT 3.1.1, ``clean_session=False``, a fixed client id per fleet,
``manual_ack=True``) and makes every paho call: connect, loop, subscribe and ``ack()``. Nothing blocks that
thread on a commit: ``on_message`` hands the payload to the ingest service and returns; the writer's completion
callback (on the writer thread) only puts ``(connection, mid, ok)`` on a queue, and the network thread sends
the PUBACKs between ``loop()`` calls. (paho's ``ack()`` queues a packet without a lock and, outside
``loop_start()``, writes the socket from the calling thread, so calling it from the writer thread would race
the network thread.)

Delivery rules:

- A QoS 1 message is acknowledged only after the transaction holding its rows (summaries stored, duplicates
  ignored, or its quarantine row) committed. The writer keeps a message whose transaction failed and retries
  it until it commits (``IngestWriter``); one it gives up (ingest stopping or not running) is not acknowledged,
  and the subscriber reconnects so that a broker that delivers again (Mosquitto) does so: a safety net.
- Acknowledgements are only sent on the connection that received the message: a PUBACK for a packet id of an
  earlier connection could acknowledge a different message the broker has since sent with that id. The broker
  re-delivers the unacknowledged message on the new connection; it is then a duplicate and acknowledged.
- The session is persistent (``clean_session=False``), so what devices publish while the server is down or
  restarting is queued by the broker and delivered when the subscriber returns. The broker must not drop
  queued messages: Mosquitto needs ``max_queued_messages`` well above its default of 1000 and
  ``max_queued_bytes 0`` (see FIELD-NOTES), and a ``max_inflight_messages`` of 100 or more for throughput
  (messages in flight to the server are at most that many; each waits for its commit).
- Reconnects back off exponentially with jitter, capped; the backoff resets after a session was up.

Visibility: the subscriber is *connected* while it is connected and subscribed (:attr:`MqttIngest.connected`,
the gauge ``edgefleet_mqtt_connected`` of :meth:`MqttIngest.metrics`, ``/healthz``'s ``mqtt`` check). Losing the
broker and getting it back are logged at WARNING, once each (the failed attempts in between at INFO when their
error changes, else DEBUG), so an outage shows in ``serve``'s log without flooding it.
"""

from __future__ import annotations

import collections
import logging
import queue
import random
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.topics import parse_topic, subscription
from edgefleet_contracts.transport import secure_client

from .errors import ConfigError
from .ingest import IngestService, IngestSource, Outcome
from .settings import ServerSettings

__all__ = ["MqttIngest", "SubmitFn", "mqtt_source"]

log = logging.getLogger(__name__)

KINDS = ("summary", "report", "heartbeat")


_READ_BYTES = 256 * 1024
_PUBACK = 0x40
_PUBLISH_QOS1 = (0x32, 0x3A)  # PUBLISH, QoS 1, not retained; without and with DUP

# (topic, packet id, payload) of one QoS 1 PUBLISH, taken from the read buffer by _IngestClient's fast read.
PublishFn = Callable[[bytes, int, bytes], None]


class _IngestClient(mqtt.Client):
    """paho's client with two costs of the ingest thread cut (``bench/ingest.py`` measures the thread):

    - **Reads.** paho reads each packet with three or four ``recv()`` calls (command byte, each length byte, the
      rest) after a ``select()``, and one packet per ``loop()``. Here one ``recv()`` takes up to 256 KB and
      paho's small reads are served from that buffer; ``loop_read`` goes on while it holds bytes, so every
      packet already received is handled before the next ``select()``.
    - **QoS 1 PUBLISH packets** (most of what ingest reads) with ``publish_fast`` set: taken whole from that
      buffer and handed to ``publish_fast(topic, mid, payload)``, one slice each, instead of paho's reads into
      a growing bytearray, its decode, its ``MQTTMessage`` and its callback matching (measured in
      ``bench/ingest.py``). Anything else (another packet type or QoS, a retained message, a packet not yet
      wholly received, a malformed one) is left to paho, which reads it from the same buffer.
    - **Acknowledgements.** ``ack()`` queues one 4-byte PUBACK and writes it at once (a ``send()``, plus a byte
      on paho's wake-up socket pair, which the next ``select()`` then wakes up for and reads). ``ack_many``
      writes all acknowledgements owed at once, in one ``send()``.

    Both use paho internals (``_sock_recv``, ``_out_packet``, ``loop_write``; paho is pinned to 2.x in
    pyproject, and the ingest tests run through them); where those are missing this is plain paho.
    """

    _fast = hasattr(mqtt.Client, "_sock_recv") and hasattr(mqtt.Client, "_packet_write")

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._rbuf = b""
        self._rpos = 0
        self._fast = (self._fast and isinstance(getattr(self, "_out_packet", None), collections.deque)
                      and isinstance(getattr(self, "_in_packet", None), dict) and hasattr(self, "_msgtime_mutex"))
        self.publish_fast: PublishFn | None = None
        self.fast_publishes = 0  # QoS 1 PUBLISH packets taken by the fast read (tests check it is used)

    def _sock_recv(self, bufsize: int) -> bytes:
        if not self._fast:
            return super()._sock_recv(bufsize)
        if self._rpos >= len(self._rbuf):
            data = super()._sock_recv(_READ_BYTES)  # BlockingIOError when nothing is there: paho's "again"
            if not data:
                return data  # connection closed
            self._rbuf, self._rpos = data, 0
        chunk = self._rbuf[self._rpos:self._rpos + bufsize]
        self._rpos += len(chunk)
        return chunk

    def _packet_read(self) -> MQTTErrorCode:
        handler = self.publish_fast
        if handler is None or not self._fast or self._in_packet["command"] != 0:
            return super()._packet_read()
        buf, pos = self._rbuf, self._rpos
        if pos >= len(buf):
            try:
                data = super()._sock_recv(_READ_BYTES)
            except BlockingIOError:
                return MQTTErrorCode.MQTT_ERR_AGAIN
            except OSError:  # paho's _packet_read answers the same (it logs, then the loop disconnects)
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            if not data:
                return MQTTErrorCode.MQTT_ERR_CONN_LOST
            self._rbuf, self._rpos = buf, pos = data, 0
        if buf[pos] not in _PUBLISH_QOS1:
            return super()._packet_read()
        end = len(buf)
        i, length, shift = pos + 1, 0, 0
        while True:  # the remaining length: 1-4 bytes, 7 bits each, low first
            if i >= end or shift > 21:
                return super()._packet_read()  # not all here yet, or malformed: paho reads it (and judges it)
            b = buf[i]
            i += 1
            length |= (b & 127) << shift
            shift += 7
            if not b & 128:
                break
        stop = i + length
        if stop > end or length < 5:
            return super()._packet_read()
        topic_end = i + 2 + ((buf[i] << 8) | buf[i + 1])
        if topic_end == i + 2 or topic_end + 2 > stop:
            return super()._packet_read()  # an empty or overlong topic: paho reports the packet malformed
        self._rpos = stop
        with self._msgtime_mutex:
            self._last_bytes_received = mqtt.time_func()  # paho's clock, for its keepalive
        self.fast_publishes += 1
        handler(buf[i + 2:topic_end], (buf[topic_end] << 8) | buf[topic_end + 1], buf[topic_end + 2:stop])
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._rpos < len(self._rbuf) and self._sock is not None:
            rc = super().loop_read(max_packets)
        return rc

    def ack_many(self, mids: list[int]) -> MQTTErrorCode:
        """PUBACK each of ``mids`` (QoS 1, manual acknowledgement), in one write."""
        if not mids:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        if not self._fast:
            rcs = [self.ack(mid, 1) for mid in mids]
            return next((rc for rc in rcs if rc != MQTTErrorCode.MQTT_ERR_SUCCESS), MQTTErrorCode.MQTT_ERR_SUCCESS)
        packet = b"".join(struct.pack("!BBH", _PUBACK, 2, mid) for mid in mids)
        # What ``_packet_queue`` does, without its byte on the wake-up socket pair: this client is looped by
        # the thread calling this (no ``loop_start``), so there is no select() in another thread to wake, and
        # that byte would only make the next select() return at once and cost two more system calls.
        self._out_packet.append({"command": _PUBACK, "mid": 0, "qos": 0, "pos": 0, "to_process": len(packet),
                                 "packet": packet, "info": None})
        return self.loop_write()


class SubmitFn(Protocol):
    def __call__(self, kind: str, payload: bytes, *, topic_device: str | None, source: str,
                 done: Callable[[Outcome], None] | None = None) -> None: ...


def _address(url: str) -> tuple[str, int, bool]:
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise ConfigError(f"broker {url!r} must look like mqtt://host:port or mqtts://host:port")
    try:
        port = u.port
    except ValueError as exc:
        raise ConfigError(f"broker {url!r} has an invalid port: {exc}") from None
    return u.hostname, port or (8883 if u.scheme == "mqtts" else 1883), u.scheme == "mqtts"


class MqttIngest(IngestSource):
    """Subscribes to the fleet's summary, report and heartbeat topics and feeds ``submit``.

    Raises ConfigError (constructor) when the broker URL cannot work.
    """

    def __init__(self, settings: ServerSettings, submit: SubmitFn, *, client_id: str | None = None,
                 keepalive: int = 30, connect_timeout: float = 5.0, backoff_initial: float = 0.2,
                 backoff_max: float = 10.0, tick: float = 0.1, ack_poll: float = 0.002,
                 username: str | None = None, password: str | None = None, tls_ca: str | None = None) -> None:
        self.url = settings.broker_url()
        self.host, self.port, self.tls = _address(self.url)
        self.fleet = settings.fleet
        self.client_id = client_id or f"edgefleet-server-{settings.fleet}"
        self._submit = submit
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._tick = tick
        self._ack_poll = ack_poll
        self._username, self._password, self._tls_ca = username, password, tls_ca
        self._topics = [(subscription(settings.fleet, k), 1) for k in KINDS]
        self._parsed_topics: dict[str, tuple[str, str]] = {}  # topic -> (kind, device): parsed once, bounded
        self._random = random.Random()

        self._lock = threading.Lock()  # guards counters and state read from other threads
        self._counters = {"connects": 0, "messages": 0, "acked": 0, "stale_acks": 0, "failed": 0,
                          "ignored": 0, "paused_dropped": 0}
        self._last_error: str | None = None
        self._connected = False  # connected and subscribed (guarded by _lock)
        self._down_since: float | None = None  # since when it fails to connect or was lost (time.time())
        self.subscribed = threading.Event()
        self._stop = threading.Event()
        self._paused = threading.Event()
        self._thread: threading.Thread | None = None
        self._acks: queue.SimpleQueue[tuple[int, int, bool]] = queue.SimpleQueue()
        # Owned by the network thread:
        self._connection = 0
        self._outstanding = 0  # handed to ingest, completion not yet processed
        self._up = False
        self._refused: str | None = None
        self._reconnect = False

    # ---- public -------------------------------------------------------------------------------------
    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    @property
    def last_error(self) -> str | None:
        with self._lock:
            return self._last_error

    @property
    def connected(self) -> bool:
        """Whether the subscriber is connected to the broker and subscribed (messages are being ingested)."""
        with self._lock:
            return self._connected

    def health(self) -> dict[str, Any]:
        """``/healthz``'s ``mqtt`` check: ``status`` ``ok`` or ``down``, the broker, the last error and since
        when it is down (ISO time)."""
        with self._lock:
            connected, error, since = self._connected, self._last_error, self._down_since
        doc: dict[str, Any] = {"status": "ok" if connected else "down", "broker": f"{self.host}:{self.port}"}
        if not connected:
            doc["error"] = error or "not connected yet"
            doc["down_since"] = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since))
                                 if since is not None else None)
        return doc

    def metrics(self) -> str:
        """Prometheus text: ``edgefleet_mqtt_connected`` (1 connected and subscribed, else 0)."""
        return ("# HELP edgefleet_mqtt_connected 1 while the ingest subscriber is connected and subscribed to "
                "the MQTT broker, else 0\n"
                "# TYPE edgefleet_mqtt_connected gauge\n"
                f"edgefleet_mqtt_connected {int(self.connected)}\n")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout: float = 10.0) -> bool:
        """Start the network thread; wait (bounded) until subscribed. Returns whether it subscribed in time
        (if not, it keeps trying in the background)."""
        if not self.running:
            self._stop.clear()
            self._paused.clear()
            self._thread = threading.Thread(target=self._run, name="mqtt-ingest", daemon=True)
            self._thread.start()
        ok = self.subscribed.wait(timeout)
        if not ok:
            log.warning("mqtt ingest: not subscribed to %s within %.1f s (%s); still trying", self.url, timeout,
                        self.last_error or "no answer")
        return ok

    def pause(self) -> None:
        """Stop handing messages to ingest; those that arrive now stay unacknowledged (delivered again)."""
        self._paused.set()

    def stop(self, timeout: float = 5.0) -> bool:
        """Send the acknowledgements owed for committed messages, disconnect, join (bounded)."""
        thread = self._thread
        if thread is None:
            return True
        self._paused.set()
        self._stop.set()
        thread.join(timeout)
        if thread.is_alive():
            log.error("mqtt ingest thread did not stop within %.1f s", timeout)
            return False
        self._thread = None
        return True

    # ---- network thread -----------------------------------------------------------------------------
    def _count(self, name: str, by: int = 1) -> None:
        with self._lock:
            self._counters[name] += by

    def _set_error(self, error: str | None) -> None:
        """Record the subscriber's state: ``error`` None while a session is coming up, else why it is not
        ingesting (which also marks it disconnected, logged at WARNING when it was connected)."""
        with self._lock:
            previous, self._last_error = self._last_error, error
            lost = error is not None and self._connected
            if error is not None:
                self._connected = False
                if self._down_since is None:
                    self._down_since = time.time()
        if lost:
            log.warning("mqtt ingest: lost the broker %s: %s; devices' summaries wait on the broker until it is "
                        "back (reconnecting)", self.url, error)
        elif error:
            log.log(logging.INFO if error != previous else logging.DEBUG, "mqtt ingest: %s", error)

    def _set_connected(self) -> None:
        """Connected and subscribed: logged at WARNING when it ends an outage (failed attempts first), else INFO."""
        with self._lock:
            was, since = self._connected, self._down_since
            self._connected, self._last_error, self._down_since = True, None, None
        if was:
            return
        if since is not None:
            log.warning("mqtt ingest: connected to the broker %s again after %.0f s; ingesting", self.url,
                        time.time() - since)
        else:
            log.info("mqtt ingest: connected to the broker %s; ingesting", self.url)

    def _set_stopped(self) -> None:
        with self._lock:
            self._connected = False

    def _run(self) -> None:
        delay = self._backoff_initial
        while not self._stop.is_set():
            try:
                was_up = self._session()
            except Exception as exc:  # never let the subscriber die: record, back off, reconnect
                log.exception("mqtt ingest session failed")
                self._set_error(f"session failed: {exc!r}")
                was_up = False
            if self._stop.is_set():
                break
            if was_up:
                delay = self._backoff_initial
            self._stop.wait(self._random.uniform(delay / 2, delay))
            delay = min(delay * 2, self._backoff_max)

    def _new_client(self) -> _IngestClient:
        client = _IngestClient(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=False,
                             protocol=mqtt.MQTTv311, manual_ack=True)
        client.connect_timeout = self._connect_timeout
        try:
            secure_client(client, username=self._username, password=self._password, tls=self.tls,
                          ca_certs=self._tls_ca)
        except ValueError as exc:
            raise ConfigError(f"{self.url}: {exc}") from exc
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.publish_fast = lambda topic, mid, payload: self._deliver(client, topic, 1, mid, payload)
        return client

    def _session(self) -> bool:
        """One connection, from connect to loss (or stop). Returns whether the session came up."""
        self._connection += 1
        self._up, self._refused, self._reconnect = False, None, False
        self.subscribed.clear()
        client = self._new_client()
        try:
            client.connect(self.host, self.port, keepalive=self._keepalive)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._set_error(f"cannot connect to {self.url}: {exc}")
            return False
        deadline = time.monotonic() + self._connect_timeout
        was_up = False
        try:
            while not self._stop.is_set():
                self._send_acks(client)
                if self._reconnect:
                    self._set_error("a commit failed; reconnecting so the broker delivers its messages again")
                    break
                rc = client.loop(timeout=self._ack_poll if self._outstanding else self._tick)
                if self._refused is not None:
                    self._set_error(self._refused)
                    break
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self._set_error(f"connection to {self.url} lost: {mqtt.error_string(rc)}")
                    break
                if not self._up:
                    if time.monotonic() > deadline:
                        self._set_error(f"no CONNACK from {self.url} within {self._connect_timeout:g} s")
                        break
                    continue
                was_up = True
            else:
                self._send_acks(client)  # stop(): the service flushed first, so these are all owed
                end = time.monotonic() + 1.0
                while client.want_write() and time.monotonic() < end:
                    if client.loop(timeout=0.01) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                        break
        finally:
            self._up = False
            self.subscribed.clear()
            if self._stop.is_set():
                self._set_stopped()
            if client.is_connected():
                client.disconnect()
                end = time.monotonic() + 0.5
                while client.loop(timeout=0.02) == MQTTErrorCode.MQTT_ERR_SUCCESS and time.monotonic() < end:
                    pass
        return was_up

    def _send_acks(self, client: _IngestClient) -> None:
        mids: list[int] = []
        stale = failed = 0
        while True:
            try:
                connection, mid, ok = self._acks.get_nowait()
            except queue.Empty:
                break
            self._outstanding -= 1
            if connection != self._connection:
                stale += 1  # the broker re-delivers it on this connection; acked then
            elif not ok:
                failed += 1
                self._reconnect = True
            else:
                mids.append(mid)
        if mids and client.ack_many(mids) == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._count("acked", len(mids))
        if stale:
            self._count("stale_acks", stale)
        if failed:
            self._count("failed", failed)

    # ---- callbacks (network thread, inside client.loop) ---------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            self._refused = f"{self.url} refused the connection: {reason_code}"
            return
        self._up = True
        self._count("connects")
        self._set_error(None)
        result, _ = client.subscribe(self._topics)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._set_error(f"subscribe failed: {mqtt.error_string(result)}")

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[Any],
                      properties: Any) -> None:
        if any(rc.is_failure for rc in reason_codes):
            self._set_error(f"the broker refused the subscription to {[t for t, _ in self._topics]}: "
                            f"{', '.join(str(rc) for rc in reason_codes)}")
            return
        self._set_connected()
        self.subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._up = False

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        raw = getattr(message, "_topic", None)  # paho 2.x keeps the topic's bytes here (``.topic`` decodes them)
        topic = raw if isinstance(raw, bytes) else message.topic.encode()
        self._deliver(client, topic, message.qos, message.mid, bytes(message.payload))

    def _deliver(self, client: mqtt.Client, topic: bytes, qos: int, mid: int, payload: bytes) -> None:
        """One message from paho's ``on_message`` or ``_IngestClient``'s fast read: handed to ingest, its
        acknowledgement queued by the writer once committed (QoS 1)."""
        if self._paused.is_set():
            self._count("paused_dropped")  # not acknowledged: the broker delivers it again next session
            return
        self._count("messages")
        try:
            kind, device = self._topic(topic.decode())
        except (SchemaError, UnicodeDecodeError) as exc:
            self._count("ignored")
            log.warning("mqtt ingest: ignoring a message: %s", exc)
            if qos:
                client.ack(mid, qos)
            return
        done: Callable[[Outcome], None] | None = None
        if qos:
            connection, acks = self._connection, self._acks

            def done(outcome: Outcome) -> None:  # runs on the writer thread: only queue the ack
                acks.put((connection, mid, outcome.ok))

            self._outstanding += 1
        self._submit(kind, payload, topic_device=device, source="mqtt", done=done)

    def _topic(self, name: str) -> tuple[str, str]:
        """(kind, device) of one of our topics, parsed once per topic (a cache of at most 4096 topics, emptied
        when full). Raises SchemaError for a topic this server does not ingest."""
        known = self._parsed_topics.get(name)
        if known is not None:
            return known
        t = parse_topic(name)
        if t.fleet != self.fleet or t.kind not in KINDS:
            raise SchemaError(f"topic {name!r} is not one this server ingests")
        if len(self._parsed_topics) >= 4096:
            self._parsed_topics.clear()
        self._parsed_topics[name] = (t.kind, t.device)
        return t.kind, t.device


def mqtt_source(settings: ServerSettings, service: IngestService, **kwargs: Any) -> MqttIngest:
    """An MQTT subscriber feeding ``service``, registered as one of its sources (started and stopped with it)."""
    source = MqttIngest(settings, service.submit, **kwargs)
    service.add_source(source)
    return source
