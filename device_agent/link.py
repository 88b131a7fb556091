"""The MQTT link: drains the outbox to the broker, sends heartbeats, receives desired state.

One thread owns one paho client (MQTT 3.1.1, ``clean_session=False``, client id = device id) and does
everything on it: connect, publish, callbacks. No paho call ever crosses threads, so ``on_publish`` cannot
race ``publish()``.

Delivery rules:

- Rows leave the outbox only when the broker acknowledges the message that carried them (PUBACK -> ``mid``
  -> row ids). At most ``max_inflight`` messages are unacknowledged; ``publish()`` return codes are checked.
- Summaries go as one JSON array of up to ``batch_size`` signed envelopes per QoS 1 message; the report goes
  retained, QoS 1, signed. Rows are signed when sent, so a merged row is signed once, as merged.
- A fresh paho client is made for every connection. paho would re-send its unacknowledged messages on
  reconnect; instead we forget every in-flight ``mid`` when the connection drops and send the rows again,
  from the outbox, in id order (the server ignores a ``(device, seq)`` it already has).
- Reconnects back off exponentially with jitter, capped; the backoff resets after a session was up.
- Summaries leave at most ``max_summaries_per_minute`` a minute (480; bursts as large): under the fleet
  server's per-device rate (600 a minute by default), past which it quarantines and then drops them. Only a
  device catching up after an outage comes near it; its backlog drains at that pace instead of being refused.
- While the queue is empty the link does not read it again until the outbox commits something (or a second
  passed, for rows another process queued), and its loop blocks for ``idle_tick`` (0.5 s) instead of ``tick``
  (50 ms): an idle device costs two wakeups a second, not 20 wakeups and 20 queries; a window closed meanwhile
  leaves at most ``idle_tick`` later; anything arriving from the broker still wakes the loop at once.
- ``link.json`` in the device folder says ``connecting`` / ``connected`` / ``disconnected``, since when,
  and the last error; it is rewritten (atomically) whenever one of those changes.
"""

from __future__ import annotations

import json
import logging
import random
import ssl
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from edgefleet_contracts.atomic import atomic_write_text
from edgefleet_contracts.signing import envelope_json
from edgefleet_contracts.timeutil import fmt, utcnow
from edgefleet_contracts.topics import topic
from edgefleet_contracts.transport import secure_client

from .config import DeviceConfig, DeviceDir
from .errors import AgentError
from .link_books import InFlight, Pace
from .outbox import REPORT, SUMMARY, Outbox, OutboxError, OutboxFullError, OutboxRow

__all__ = ["BrokerAddress", "InFlight", "LinkConfigError", "LinkError", "MqttLink", "OFFLINE",
           "link_file", "link_state_for", "parse_broker", "read_password"]

log = logging.getLogger(__name__)

OFFLINE = "offline (no broker configured)"
CONNECTING, CONNECTED, DISCONNECTED = "connecting", "connected", "disconnected"


class LinkError(AgentError):
    """The MQTT link failed in a way the agent should report (not a passing network outage)."""

    reason = "link"


class LinkConfigError(LinkError):
    """The broker settings cannot work: bad URL, unreadable or unsafe password file, bad TLS CA file."""

    reason = "link_config"


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool


def parse_broker(url: str) -> BrokerAddress:
    """``mqtt://host[:1883]`` or ``mqtts://host[:8883]``. Raises LinkConfigError otherwise."""
    u = urlparse(url)
    if u.scheme not in ("mqtt", "mqtts") or not u.hostname:
        raise LinkConfigError(f"broker {url!r} must look like mqtt://host:port or mqtts://host:port")
    try:
        port = u.port
    except ValueError as exc:
        raise LinkConfigError(f"broker {url!r} has an invalid port: {exc}") from None
    return BrokerAddress(u.hostname, port or (8883 if u.scheme == "mqtts" else 1883), u.scheme == "mqtts")


def read_password(path: str) -> str:
    """Read the MQTT password file; LinkConfigError if it is missing or accessible by group or others."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError as exc:
        raise LinkConfigError(f"mqtt_password_file {p} cannot be read: {exc.strerror}") from None
    if st.st_mode & 0o077:
        raise LinkConfigError(f"mqtt_password_file {p} is accessible by group or others (mode "
                              f"{stat.filemode(st.st_mode)}); refusing to use it: run `chmod 600 {p}`")
    try:
        return p.read_text().rstrip("\r\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise LinkConfigError(f"mqtt_password_file {p} cannot be read: {exc}") from None


def link_file(device_dir: DeviceDir) -> Path:
    return device_dir.path / "link.json"


def link_state_for(cfg: DeviceConfig, device_dir: DeviceDir | None = None) -> str:
    """One line for status output: offline when no broker is configured, else the last recorded link state."""
    if cfg.broker == "":
        return OFFLINE
    if device_dir is not None:
        try:
            doc = json.loads(link_file(device_dir).read_text())
            line = f"{doc['state']} since {doc['since']} ({cfg.broker})"
            return line + (f"; last error: {doc['last_error']}" if doc.get("last_error") else "")
        except (OSError, ValueError, KeyError, TypeError):
            pass
    return f"not started ({cfg.broker})"


class MqttLink:
    """Runs the link on its own thread between ``start()`` and ``stop()``.

    ``sign`` turns an unsigned document into its signed envelope. ``on_desired`` receives the raw payload of
    each message on the device's ``desired`` topic; its exceptions are logged and counted.
    Raises LinkConfigError (from the constructor or ``start()``) when the settings cannot work.
    """

    def __init__(self, cfg: DeviceConfig, device_dir: DeviceDir, outbox: Outbox,
                 sign: Callable[[dict[str, Any]], dict[str, Any]], *, backoff_initial: float = 1.0,
                 backoff_max: float = 60.0, on_desired: Callable[[bytes], None] | None = None,
                 batch_size: int = 50, max_inflight: int = 20, keepalive: int = 60,
                 connect_timeout: float = 5.0, tick: float = 0.05, idle_tick: float = 0.5,
                 drain_seconds: float = 1.0, max_summaries_per_minute: int = 480) -> None:
        if cfg.broker == "":
            raise LinkConfigError("no broker is configured (config.toml `broker`); the agent works offline "
                                  "and no link should be started")
        if not 0 < backoff_initial <= backoff_max:
            raise LinkConfigError("backoff must satisfy 0 < backoff_initial <= backoff_max")
        if batch_size < 1 or max_inflight < 1:
            raise LinkConfigError("batch_size and max_inflight must be at least 1")
        self.cfg = cfg
        self.address = parse_broker(cfg.broker)
        self.device_dir = device_dir
        self.outbox = outbox
        self._sign = sign
        self._on_desired = on_desired
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._batch_size = batch_size
        self._keepalive = keepalive
        self._connect_timeout = connect_timeout
        self._tick = tick
        self._idle_tick = max(tick, idle_tick)
        self._drain_seconds = drain_seconds
        self._random = random.Random()
        self._topics = {k: topic(cfg.fleet, cfg.device_id, k) for k in ("summary", "report", "heartbeat", "desired")}
        self._password: str | None = None

        self._lock = threading.Lock()  # guards state and counters (read from other threads)
        self._state = DISCONNECTED
        self._since = fmt(utcnow())
        self._last_error: str | None = None
        self._written: tuple[str, str | None] | None = None
        self._down = False  # an outage was logged at WARNING; its end will be
        self._counters = {"sent": 0, "acked": 0, "messages_sent": 0, "messages_acked": 0, "publish_errors": 0,
                          "connects": 0, "reconnects": 0, "heartbeats": 0, "subscribed": 0, "desired_received": 0,
                          "desired_errors": 0, "link_file_errors": 0, "stale_reads": 0}

        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Owned by the link thread only:
        self._inflight = InFlight(max_inflight)
        self._pace = Pace(max_summaries_per_minute, time.monotonic())
        self._paced = False
        self._session_up = False
        self._refused: str | None = None
        self._next_heartbeat = 0.0
        self._pump_paused_until = 0.0
        self._idle_generation = -1  # outbox generation when the queue was last found empty (-1: look again)
        self._next_idle_look = 0.0

    # ---- public ------------------------------------------------------------------------------------
    @property
    def state(self) -> str:
        with self._lock:
            return self._state

    @property
    def last_error(self) -> str | None:
        with self._lock:
            return self._last_error

    def counters(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counters)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Check the credentials and TLS settings, then start the link thread.

        Raises LinkConfigError when the password file is unsafe or unreadable or the username is missing.
        """
        if self.running:
            return
        if self.cfg.mqtt_password_file:
            if not self.cfg.mqtt_username:
                raise LinkConfigError("mqtt_password_file is set but mqtt_username is empty")
            self._password = read_password(self.cfg.mqtt_password_file)
        if self.address.tls and self.cfg.mqtt_tls_ca and not Path(self.cfg.mqtt_tls_ca).is_file():
            raise LinkConfigError(f"mqtt_tls_ca {self.cfg.mqtt_tls_ca} does not exist")
        self._stop.clear()
        self._set_state(CONNECTING, None)
        self._thread = threading.Thread(target=self._run, name=f"mqtt-link-{self.cfg.device_id}", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = None) -> bool:
        """Disconnect and join the thread within ``timeout`` (default: drain + connect timeout + 2 s).

        Waits up to ``drain_seconds`` for in-flight acknowledgements first. Returns False (and logs) if the
        thread did not end in time.
        """
        thread = self._thread
        if thread is None:
            return True
        self._stop.set()
        thread.join(self._drain_seconds + self._connect_timeout + 2.0 if timeout is None else timeout)
        if thread.is_alive():
            log.error("mqtt link thread did not stop within the timeout")
            return False
        self._thread = None
        return True

    # ---- state -------------------------------------------------------------------------------------
    def _set_state(self, state: str, error: str | None = None) -> None:
        with self._lock:
            if state != self._state:
                self._state = state
                self._since = fmt(utcnow())
            self._last_error = error
            snapshot = (self._state, self._last_error)
            doc = {"state": self._state, "since": self._since, "last_error": self._last_error}
        if snapshot == self._written:
            return
        # An outage and its end are logged at WARNING once each (the log of `run` showed nothing for days offline,
        # found by an offline-clinic audit); the retries in between, and changes of error, at INFO.
        if state == DISCONNECTED and error and not self._down:
            self._down = True
            log.warning("mqtt link to %s is down (%s); summaries wait in the outbox and are sent when it is back",
                        self.cfg.broker, error)
        elif state == CONNECTED and self._down:
            self._down = False
            log.warning("mqtt link to %s is back", self.cfg.broker)
        elif state != CONNECTED and error:
            log.info("mqtt link %s: %s", state, error)
        try:
            atomic_write_text(link_file(self.device_dir), json.dumps(doc, indent=1) + "\n")
            self._written = snapshot
        except OSError as exc:
            self._count("link_file_errors")
            log.warning("cannot write %s: %s", link_file(self.device_dir), exc)

    def _count(self, name: str, by: int = 1) -> None:
        with self._lock:
            self._counters[name] += by

    # ---- thread ------------------------------------------------------------------------------------
    def _run(self) -> None:
        delay = self._backoff_initial
        while not self._stop.is_set():
            try:
                was_up = self._session()
            except Exception as exc:  # e.g. the outbox failed: record it, back off, try again; never die
                log.exception("mqtt link session failed")
                self._set_state(DISCONNECTED, f"link failed: {exc!r}")
                was_up = False
            if self._stop.is_set():
                break
            if was_up:
                delay = self._backoff_initial
            self._stop.wait(self._random.uniform(delay / 2, delay))
            delay = min(delay * 2, self._backoff_max)
        self._set_state(DISCONNECTED, None)  # stopped on purpose: no error

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.cfg.device_id, clean_session=False,
                             protocol=mqtt.MQTTv311)
        client.connect_timeout = self._connect_timeout
        client.max_inflight_messages_set(self._inflight.limit)
        client.max_queued_messages_set(self._inflight.limit)
        try:
            secure_client(client, username=self.cfg.mqtt_username, password=self._password, tls=self.address.tls,
                          ca_certs=self.cfg.mqtt_tls_ca or None)
        except ValueError as exc:
            raise LinkConfigError(f"{exc} (device config mqtt_tls_ca)") from exc
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        return client

    def _session(self) -> bool:
        """One connection, from connect to loss (or stop). Returns whether the broker accepted the session."""
        self._inflight.reset()
        self._idle_generation = -1
        self._session_up = False
        self._refused = None
        try:
            client = self._new_client()
        except LinkConfigError as exc:
            self._set_state(DISCONNECTED, str(exc))
            return False
        try:
            client.connect(self.address.host, self.address.port, keepalive=self._keepalive)
        except (OSError, ssl.SSLError, ValueError) as exc:
            self._set_state(DISCONNECTED, f"cannot connect to {self.cfg.broker}: {exc}")
            return False
        self._set_state(CONNECTING, None)
        connack_deadline = time.monotonic() + self._connect_timeout
        was_up = False
        error: str | None = None  # None when we stop on purpose
        try:
            while not self._stop.is_set():
                rc = client.loop(timeout=self._idle_tick if self._idle() else self._tick)
                if self._refused is not None:
                    error = self._refused
                    break
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    error = f"connection to {self.cfg.broker} lost: {mqtt.error_string(rc)}"
                    break
                if not self._session_up:
                    if time.monotonic() > connack_deadline:
                        error = f"no CONNACK from {self.cfg.broker} within {self._connect_timeout:g} s"
                        break
                    continue
                was_up = True
                self._pump(client)
                self._heartbeat(client)
            else:
                self._drain(client)
        finally:
            self._inflight.reset()  # unacknowledged rows stay queued and go again on the next connection
            self._session_up = False
            if client.is_connected():
                client.disconnect()
                deadline = time.monotonic() + 0.5
                while client.loop(timeout=0.05) == MQTTErrorCode.MQTT_ERR_SUCCESS and time.monotonic() < deadline:
                    pass
        self._set_state(DISCONNECTED, error)
        return was_up

    def _idle(self) -> bool:
        """Connected, nothing in flight, and nothing committed to the outbox since the queue was found empty:
        the loop may block longer (an incoming message still wakes it at once)."""
        return (self._session_up and not len(self._inflight)
                and self.outbox.generation == self._idle_generation)

    def _drain(self, client: mqtt.Client) -> None:
        """On stop: wait (bounded) for acknowledgements of what is in flight, to avoid needless re-sends."""
        deadline = time.monotonic() + self._drain_seconds
        while self._session_up and len(self._inflight) and time.monotonic() < deadline:
            if client.loop(timeout=self._tick) != MQTTErrorCode.MQTT_ERR_SUCCESS:
                return

    # ---- callbacks (run on the link thread, inside client.loop) -----------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                    properties: Any) -> None:
        if reason_code.is_failure:
            self._refused = f"{self.cfg.broker} refused the connection: {reason_code}"
            return
        self._session_up = True
        with self._lock:
            self._counters["connects"] += 1
            if self._counters["connects"] > 1:
                self._counters["reconnects"] += 1
        self._next_heartbeat = 0.0
        result, _ = client.subscribe(self._topics["desired"], qos=1)
        if result != MQTTErrorCode.MQTT_ERR_SUCCESS:
            log.warning("subscribe to %s failed: %s", self._topics["desired"], mqtt.error_string(result))
        self._set_state(CONNECTED, None)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reason_codes: list[Any],
                      properties: Any) -> None:
        if any(rc.is_failure for rc in reason_codes):  # e.g. an ACL that does not allow the desired topic
            self._set_state(CONNECTED, f"the broker refused the subscription to {self._topics['desired']}: "
                                       f"{', '.join(str(rc) for rc in reason_codes)}")
            return
        self._count("subscribed")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason_code: Any,
                       properties: Any) -> None:
        self._session_up = False

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason_code: Any,
                    properties: Any) -> None:
        ids = self._inflight.ack(mid)
        if not ids:
            return
        try:
            self.outbox.ack(ids)
        except OutboxError as exc:  # rows stay queued and are re-sent on the next connection
            log.warning("cannot delete acknowledged outbox rows: %s", exc)
            return
        with self._lock:
            self._counters["acked"] += len(ids)
            self._counters["messages_acked"] += 1

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        if message.topic != self._topics["desired"]:
            return
        self._count("desired_received")
        if self._on_desired is None:
            return
        try:
            self._on_desired(bytes(message.payload))
        except Exception:
            self._count("desired_errors")
            log.exception("on_desired failed for a message on %s", message.topic)

    # ---- sending -----------------------------------------------------------------------------------
    def _next_message(self) -> tuple[list[OutboxRow], str, bytes, bool] | None:
        """The next rows to send, their topic, the payload and the retain flag; None when nothing is queued."""
        rows = self.outbox.peek(self._batch_size, after_id=self._inflight.last_row_id)
        if not rows:
            return None
        if rows[0].kind == REPORT:
            envelope = envelope_json(self._sign(rows[0].document()))
            return rows[:1], self._topics["report"], envelope, True
        batch = []
        allowed = self._pace.allowed(time.monotonic())
        for row in rows[:allowed]:
            if row.kind != SUMMARY:
                break
            batch.append(row)
        if not batch:  # paced: summaries are queued but may not leave yet (not idle: look again soon)
            self._pump_paused_until = time.monotonic() + self._pace.wait(time.monotonic())
            self._paced = True
            return None
        # Each signed part travels as the exact bytes signed, so the server verifies what it received.
        envelopes = b",".join(envelope_json(self._sign(row.document())) for row in batch)
        return batch, self._topics["summary"], b"[" + envelopes + b"]", False

    def _pump(self, client: mqtt.Client) -> None:
        now = time.monotonic()
        if now < self._pump_paused_until:
            return
        # Idle: the queue was empty and no transaction of this process committed since. Look anyway once a
        # second, for rows another process (the CLI) queued.
        if self.outbox.generation == self._idle_generation and now < self._next_idle_look:
            return
        while self._session_up and self._inflight.room() > 0 and not self._stop.is_set():
            try:
                generation = self.outbox.generation  # read before the queue: a later commit is seen next time
                self._paced = False
                nxt = self._next_message()
                if nxt is None:
                    if not self._paced:
                        self._idle_generation = generation
                        self._next_idle_look = time.monotonic() + 1.0
                    return
                rows, tpc, payload, retain = nxt
                ids = [r.id for r in rows]
                if not self.outbox.claim(rows):  # merged or replaced since read: read the queue again
                    self._count("stale_reads")
                    continue
            except OutboxFullError as exc:  # a full disk (an outbox it kept closed, a claim): expected, no trace
                self._count("publish_errors")
                self._set_state(CONNECTED, f"cannot prepare outbox rows: {exc}")
                self._pump_paused_until = time.monotonic() + self._backoff_initial
                return
            except Exception as exc:  # a row that cannot be read or signed, a locked outbox: keep, report, retry
                self._count("publish_errors")
                self._set_state(CONNECTED, f"cannot prepare outbox rows: {exc!r}")
                log.exception("cannot prepare outbox rows for sending; retrying in %g s", self._backoff_initial)
                self._pump_paused_until = time.monotonic() + self._backoff_initial
                return
            info = client.publish(tpc, payload, qos=1, retain=retain)
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                # Never assume: e.g. MQTT_ERR_QUEUE_SIZE (15) past paho's queue limit, NO_CONN when the socket
                # just closed. The rows stay queued; the connection loop decides what happens next.
                self._count("publish_errors")
                self._set_state(CONNECTED, f"publish to {tpc} failed: {mqtt.error_string(info.rc)} "
                                           f"(rc={int(info.rc)})")
                return
            self._inflight.add(info.mid, ids)
            if tpc == self._topics["summary"]:
                self._pace.take(len(ids), time.monotonic())
            with self._lock:
                self._counters["sent"] += len(ids)
                self._counters["messages_sent"] += 1

    def _heartbeat(self, client: mqtt.Client) -> None:
        now = time.monotonic()
        if now < self._next_heartbeat:
            return
        self._next_heartbeat = now + self.cfg.heartbeat_seconds
        c = self.outbox.counters()
        doc: dict[str, Any] = {"device_id": self.cfg.device_id, "at": fmt(utcnow())}
        if "depth" in c:  # absent while a full disk keeps the outbox closed
            doc["outbox_depth"] = c["depth"]
        if c["write_errors"]:  # e.g. a full disk: the operator sees it although nothing can be queued
            doc.update(outbox_write_errors=c["write_errors"], outbox_disk_full=c["disk_full"])
        info = client.publish(self._topics["heartbeat"], json.dumps(doc).encode(), qos=0)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._count("heartbeats")
        else:
            self._count("publish_errors")
