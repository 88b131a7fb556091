"""A real Mosquitto broker for tests: own config, own folder, free loopback port, bounded start and stop.

Configuration that matters (see ../shared/FIELD-NOTES.md):

- ``max_queued_messages 1000000`` and ``max_queued_bytes 0``: the default (1000) silently drops QoS 1 messages
  to a subscriber that falls behind, while every publisher still gets its acknowledgement.
- ``user root`` when the tests run as root: otherwise Mosquitto drops to the ``mosquitto`` user and cannot
  write its persistence file in a root-owned temp folder. The log goes to stderr, which we redirect to a file
  we opened ourselves, so logging works either way.
- ``persistence`` is off unless asked for; with it on, sessions and retained messages survive ``restart()``
  (the broker saves its database on SIGTERM).

Mosquitto must be installed (``make test`` installs it through ``.ci/system-deps``); a missing broker is a
failure, never a skip.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

CANDIDATES = ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


class BrokerError(RuntimeError):
    """The test broker is missing, did not start or did not stop (the message carries its log)."""


def find_mosquitto() -> str:
    """Path of the mosquitto binary; BrokerError naming how to install it when there is none."""
    for c in CANDIDATES:
        if os.access(c, os.X_OK):
            return c
    found = shutil.which("mosquitto")
    if found:
        return found
    raise BrokerError(
        "mosquitto is not installed (looked in /usr/sbin, /usr/local/sbin and on PATH). The device-agent and "
        "fleet-server tests need a real broker: run `make test` (it runs .ci/system-deps, which installs "
        "Mosquitto as root), or `bash .ci/system-deps`, or `apt-get install mosquitto`."
    )


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A loopback port that is free now, chosen below the kernel's ephemeral range.

    A port the kernel hands out for binding to 0 comes from the ephemeral range, which every outgoing
    connection (paho clients, httpx) also draws from: between this call and the server binding it, one of
    them could take it ("address already in use", seen in CI). Ports below that range are not handed out
    implicitly, so only another explicit bind can race for it."""
    low, _ = _ephemeral_range()
    for _ in range(200):
        port = random.randint(max(1024, low - 12000), low - 1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:  # everything below was taken: fall back
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def password_line(username: str, password: str) -> str:
    """One Mosquitto 2.x password-file line (PBKDF2-SHA512, the ``$7$`` format mosquitto_passwd writes)."""
    salt = os.urandom(12)
    iterations = 101
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"{username}:$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path  # what clients trust
    cert: Path  # the broker's certificate (for 127.0.0.1 and localhost), signed by the CA
    key: Path


def make_tls_files(folder: Path, name: str = "test-ca") -> TlsFiles:
    """A fresh CA and a broker certificate for 127.0.0.1 / localhost, written as PEM files in ``folder``."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = TlsFiles(folder / f"{name}.pem", folder / "broker.pem", folder / "broker.key")
    files.ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))
    files.key.chmod(0o600)
    return files


class Mosquitto:
    """One Mosquitto process on 127.0.0.1:<port>, configured and logging inside ``folder``.

    ``users`` maps usernames to passwords; when given, anonymous clients are refused. ``restart()`` keeps the
    same port. Use as a context manager or call ``start()`` / ``stop()``.
    """

    def __init__(self, folder: Path | None = None, *, port: int | None = None,
                 users: dict[str, str] | None = None, persistence: bool = False, tls: TlsFiles | None = None,
                 start_timeout: float = 10.0, extra_config: str = "") -> None:
        self.binary = find_mosquitto()
        self._own_folder = folder is None
        self.folder = Path(tempfile.mkdtemp(prefix="mosquitto-")) if folder is None else Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self.users = dict(users or {})
        self.persistence = persistence
        self.tls = tls
        self.start_timeout = start_timeout
        self.extra_config = extra_config
        self.config_file = self.folder / "mosquitto.conf"
        self.log_file = self.folder / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config()

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _write_config(self) -> None:
        lines = [
            f"listener {self.port} {self.host}",
            *([f"cafile {self.tls.ca_cert}", f"certfile {self.tls.cert}", f"keyfile {self.tls.key}"]
              if self.tls else []),
            "max_queued_messages 1000000",
            "max_queued_bytes 0",
            "max_inflight_messages 100",
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # else it drops to `mosquitto` and cannot write in our folder
        if self.users:
            pw = self.folder / "passwords"
            pw.write_text("".join(password_line(u, p) + "\n" for u, p in self.users.items()))
            pw.chmod(0o600)
            lines += ["allow_anonymous false", f"password_file {pw}"]
        else:
            lines.append("allow_anonymous true")
        if self.persistence:
            lines += ["persistence true", f"persistence_location {self.folder}/", "autosave_interval 0"]
        else:
            lines.append("persistence false")
        if self.extra_config:
            lines.append(self.extra_config)
        self.config_file.write_text("\n".join(lines) + "\n")

    def log(self) -> str:
        try:
            return self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self) -> Mosquitto:
        """Start the broker and wait (bounded) until its port accepts connections; BrokerError otherwise."""
        if self.running:
            return self
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen([self.binary, "-c", str(self.config_file)], stdout=log,
                                          stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise BrokerError(f"mosquitto exited with code {self._proc.returncode} at start "
                                  f"(config {self.config_file}); its log:\n{self.log()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=0.2):
                return self  # a bare TCP connect: fine for TLS listeners too (the broker logs a failed handshake)
            time.sleep(0.02)
        self._kill()
        raise BrokerError(f"mosquitto did not accept connections on {self.host}:{self.port} within "
                          f"{self.start_timeout:.0f} s; its log:\n{self.log()}")

    def stop(self, timeout: float = 5.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout`` seconds; always waits for the process (by its PID)."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired as exc:
                raise BrokerError(f"mosquitto (pid {proc.pid}) did not exit after SIGKILL") from exc

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)

    def restart(self) -> Mosquitto:
        """Stop and start again on the same port (clients see a lost connection, then a broker again)."""
        self.stop()
        return self.start()

    def close(self) -> None:
        self.stop()
        if self._own_folder:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> Mosquitto:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class Subscriber:
    """A paho client (its own network thread) that subscribes at QoS 1 and keeps every message it gets.

    With ``clean_session=False`` and a broker with persistence, messages published while it is away are kept
    for it across a broker restart. It reconnects by itself (paho's loop) and re-subscribes on connect.
    """

    def __init__(self, broker: Mosquitto, topics: list[str], *, client_id: str | None = None,
                 clean_session: bool = True, username: str | None = None, password: str | None = None) -> None:
        self.broker = broker
        self.topics = topics
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"sub-{uuid.uuid4().hex[:8]}",
                                  clean_session=clean_session, protocol=mqtt.MQTTv311)
        self.client.reconnect_delay_set(0.05, 0.5)  # type: ignore[arg-type]  # floats work; the hint says int
        if username:
            self.client.username_pw_set(username, password)
        self.subscribed = threading.Event()
        self._cond = threading.Condition()
        self._messages: list[Received] = []
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: object, props: object) -> None:
        self.subscribed.clear()
        if self.topics:
            client.subscribe([(t, 1) for t in self.topics])
        else:  # a publish-only client
            self.subscribed.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, rcs: object, props: object) -> None:
        self.subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._messages.append(Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos))
            self._cond.notify_all()

    def start(self, timeout: float = 5.0) -> Subscriber:
        self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        self.client.loop_start()
        if not self.subscribed.wait(timeout):
            self.stop()
            raise BrokerError(f"test subscriber was not subscribed to {self.topics} within {timeout} s; "
                              f"broker log:\n{self.broker.log()}")
        return self

    def wait_subscribed(self, timeout: float = 5.0) -> bool:
        return self.subscribed.wait(timeout)

    def messages(self, topic: str | None = None) -> list[Received]:
        with self._cond:
            return [m for m in self._messages if topic is None or m.topic == topic]

    def wait_for(self, predicate: Callable[[list[Received]], bool], timeout: float) -> bool:
        """Wait (bounded) until ``predicate(messages so far)`` holds; returns whether it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self._messages)):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
            return True

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def __enter__(self) -> Subscriber:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass(frozen=True)
class SeenPublish:
    connection: int  # 1 for the first client connection, 2 for the next, ...
    topic: str
    qos: int
    retain: bool
    payload: bytes


class SilentBroker:
    """Speaks just enough MQTT 3.1.1 to accept a client (CONNACK, SUBACK, PINGRESP) and never acknowledges a
    PUBLISH: the one thing a real broker cannot be told to do. Records every PUBLISH it receives.

    ``drop_client()`` closes the current connection (the client sees a lost connection and may reconnect).
    """

    def __init__(self) -> None:
        self._server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._server.bind(("127.0.0.1", 0))
        self._server.listen(4)
        self._server.settimeout(0.05)
        self.host = "127.0.0.1"
        self.port = int(self._server.getsockname()[1])
        self.connections = 0
        self._lock = threading.Lock()
        self._publishes: list[SeenPublish] = []
        self._stop = threading.Event()
        self._drop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="silent-broker", daemon=True)

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def publishes(self) -> list[SeenPublish]:
        with self._lock:
            return list(self._publishes)

    def wait_for(self, predicate: Callable[[list[SeenPublish]], bool], timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate(self.publishes()):
                return True
            time.sleep(0.02)
        return predicate(self.publishes())

    def drop_client(self) -> None:
        self._drop.set()

    def start(self) -> SilentBroker:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._server.close()

    def __enter__(self) -> SilentBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                self.connections += 1
                self._drop.clear()
                self._serve_one(conn, self.connections)

    def _serve_one(self, conn: socket.socket, number: int) -> None:
        conn.settimeout(0.05)
        buf = bytearray()
        while not self._stop.is_set() and not self._drop.is_set():
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while True:
                packet = _split_packet(buf)
                if packet is None:
                    break
                header, body = packet
                kind = header >> 4
                if kind == 1:  # CONNECT -> CONNACK accepted, no session present
                    conn.sendall(b"\x20\x02\x00\x00")
                elif kind == 8:  # SUBSCRIBE -> SUBACK granting QoS 1 to the first filter
                    conn.sendall(b"\x90\x03" + bytes(body[:2]) + b"\x01")
                elif kind == 12:  # PINGREQ -> PINGRESP
                    conn.sendall(b"\xd0\x00")
                elif kind == 14:  # DISCONNECT
                    return
                elif kind == 3:  # PUBLISH: record, never acknowledge
                    qos = (header >> 1) & 3
                    n = int.from_bytes(body[:2], "big")
                    tpc = bytes(body[2:2 + n]).decode()
                    start = 2 + n + (2 if qos else 0)
                    with self._lock:
                        self._publishes.append(SeenPublish(number, tpc, qos, bool(header & 1), bytes(body[start:])))


def _split_packet(buf: bytearray) -> tuple[int, bytearray] | None:
    """Remove and return one complete MQTT packet (fixed header byte, body) from ``buf``; None if incomplete."""
    if len(buf) < 2:
        return None
    length, mult, i = 0, 1, 1
    while True:
        if i >= len(buf):
            return None
        byte = buf[i]
        length += (byte & 0x7F) * mult
        mult *= 128
        i += 1
        if not byte & 0x80:
            break
    if len(buf) < i + length:
        return None
    header, body = buf[0], buf[i:i + length]
    del buf[:i + length]
    return header, body
