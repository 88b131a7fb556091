"""Fleet-server fixtures: settings and store in tmp_path, enrolled devices with their keys, the published
``clinical 1.0.0`` package (real, signed), summaries signed by real device keys, a real Mosquitto per test."""

from __future__ import annotations

import io
import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edgefleet_contracts.signing import Ed25519PrivateKey, envelope_json, generate_key, public_b64, sign_envelope
from edgefleet_contracts.summary import Summary
from edgefleet_contracts.timeutil import fmt
from fleet_server.devices import enroll
from fleet_server.registry import publish
from fleet_server.settings import ServerSettings
from fleet_server.store import Store
from tests.brokers import Mosquitto
from tests.device_agent.conftest import summary as _agent_summary

FLEET = "fleet-a"
# Windows are laid out from a fixed point well in the past (the server refuses windows in the future).
T0 = datetime.now(UTC).replace(microsecond=0) - timedelta(days=10)


def make_summary(seq: int, device_id: str, *, model: str = "clinical", version: str = "1.0.0",
                 start: datetime | None = None, **kw: Any) -> Summary:
    """A valid summary (the agent tests' factory) whose 60 s window starts at ``T0 + seq`` minutes."""
    s = _agent_summary(seq, device_id=device_id, model=model, version=version, **kw)
    begin = start or T0 + timedelta(minutes=seq)
    return replace(s, start=fmt(begin), end=fmt(begin + timedelta(seconds=60)))


@dataclass
class Device:
    device_id: str
    key: Ed25519PrivateKey

    def envelope(self, seq: int, *, signer: Ed25519PrivateKey | None = None, **kw: Any) -> dict[str, Any]:
        return sign_envelope(make_summary(seq, self.device_id, **kw).to_dict(), signer or self.key)

    def message(self, seqs: range | list[int], **kw: Any) -> bytes:
        """One JSON array of signed envelopes, as the agent's link sends it (each signed part canonical)."""
        return b"[" + b",".join(envelope_json(self.envelope(s, **kw)) for s in seqs) + b"]"

    def legacy_message(self, seqs: range | list[int], **kw: Any) -> bytes:
        """The same envelopes as plain JSON (keys in document order, as earlier agents sent them)."""
        return json.dumps([self.envelope(s, **kw) for s in seqs], separators=(",", ":")).encode()


@dataclass
class Fleet:
    settings: ServerSettings
    store: Store
    devices: dict[str, Device] = field(default_factory=dict)

    def __getitem__(self, device_id: str) -> Device:
        return self.devices[device_id]

    def seqs(self, device_id: str) -> list[int]:
        rows = self.store.query("SELECT seq FROM summaries WHERE device_id = ? ORDER BY seq", (device_id,))
        return [int(r[0]) for r in rows]

    def stored(self) -> int:
        row = self.store.one("SELECT COUNT(*) FROM summaries")
        return int(row[0]) if row else 0

    def quarantined(self, reason: str | None = None) -> list[Any]:
        if reason is None:
            return self.store.query("SELECT * FROM quarantine ORDER BY id")
        return self.store.query("SELECT * FROM quarantine WHERE reason = ? ORDER BY id", (reason,))


FleetFactory = Callable[..., Fleet]


@pytest.fixture
def make_fleet(tmp_path: Path, built: Any) -> Iterator[FleetFactory]:
    """``make_fleet(**settings)``: a server data folder with ``clinical 1.0.0`` published and devices
    ``dev-1`` and ``dev-2`` enrolled with fresh keys. Broker ``none`` unless given."""
    stores: list[Store] = []

    def make(**overrides: Any) -> Fleet:
        overrides.setdefault("broker", "none")
        overrides.setdefault("fleet", FLEET)
        overrides.setdefault("device_rate_per_minute", 100_000)
        settings = ServerSettings(data_dir=tmp_path / f"server{len(stores)}", **overrides)
        store = Store(settings.db_path)
        stores.append(store)
        settings.root_pub.parent.mkdir(parents=True, exist_ok=True)  # as `fleet-server init` pins it
        shutil.copyfile(built.keys / "root.pub", settings.root_pub)
        publish(store, settings.packages_dir, built.keys / "root.pub", built.package, owner="clinical-ml",
                oncall="http://127.0.0.1:9/x")
        fleet = Fleet(settings, store)
        for name in ("dev-1", "dev-2"):
            key = generate_key()
            enroll(store, settings.fleet, name, public_b64(key.public_key()))
            fleet.devices[name] = Device(name, key)
        return fleet

    yield make
    for s in stores:
        s.close()


@pytest.fixture
def start_app() -> Iterator[Callable[[Fleet, Callable[[Any, Any], Any]], tuple[Any, Any]]]:
    """``start_app(fleet, attach)``: the fleet's app with ``attach(app, ctx)`` (which returns its service), its
    lifespan running (TestClient context) until the test ends. Returns (client, service)."""
    from fastapi.testclient import TestClient

    from fleet_server.app import create_app

    clients: list[TestClient] = []

    def start(fleet: Fleet, attach: Callable[[Any, Any], Any]) -> tuple[TestClient, Any]:
        app = create_app(fleet.settings, fleet.store)
        svc = attach(app, app.state.ctx)
        client = TestClient(app)
        client.__enter__()
        clients.append(client)
        return client, svc

    yield start
    for c in clients:
        c.__exit__(None, None, None)


@pytest.fixture
def make_http(make_fleet: FleetFactory, start_app: Any) -> Callable[..., Any]:
    """``make_http(**settings)``: (client, fleet, ingest service) — the app with ingest attached, running."""
    from fleet_server.routes_ingest import attach_ingest

    def make(**settings: Any) -> Any:
        fleet = make_fleet(**settings)
        client, svc = start_app(fleet, attach_ingest)
        return client, fleet, svc

    return make


@pytest.fixture
def http(make_http: Callable[..., Any]) -> Any:
    return make_http()


@pytest.fixture
def cli_data(built: Any, tmp_path: Path) -> Path:
    """A data folder made as an operator makes one, by the CLI: initialised with the session's root key,
    ``clinical 1.0.0`` published (owner ``ml``), ``dev-1`` enrolled."""
    from fleet_server.cli import main as fleet_cli

    d = tmp_path / "srv"
    assert fleet_cli(["init", "--data", str(d), "--root-key", str(built.keys / "root.pub")]) == 0
    assert fleet_cli(["models", "publish", str(built.package), "--data", str(d), "--owner", "ml", "--oncall",
                      "http://127.0.0.1:9/x"]) == 0
    assert fleet_cli(["devices", "enroll", "--data", str(d), "--device-id", "dev-1", "--public-key",
                      str(built.keys / "root.pub")]) == 0
    return d


@pytest.fixture
def fleet(make_fleet: FleetFactory) -> Fleet:
    return make_fleet()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A running Mosquitto on a free loopback port (anonymous, no persistence); stopped after the test."""
    broker = Mosquitto(tmp_path / "mosquitto")
    broker.start()
    try:
        yield broker
    finally:
        broker.close()


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    """``fleet-server ARGV`` in this process: (exit code, standard output, standard error)."""
    from fleet_server.cli import main as fleet_cli

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = fleet_cli(argv)
    return rc, out.getvalue(), err.getvalue()
