"""Bad API input is a 4xx naming the problem, never a 500: wrong JSON types and values in bodies, ids past
SQLite's integer range. Also: the database is owner-only, and /metrics answers (its gauges read SQLite)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet_contracts.signing import generate_key, public_b64
from fleet_server.auth import create_token
from fleet_server.cli import main as fleet_cli
from fleet_server.server import build
from fleet_server.settings import ServerSettings


@pytest.fixture()
def api(built: Any, tmp_path: Any) -> Iterator[tuple[TestClient, dict[str, str], ServerSettings]]:
    data = tmp_path / "server"
    assert fleet_cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub")]) == 0
    assert fleet_cli(["models", "publish", str(built.package), "--data", str(data), "--owner", "ml", "--oncall",
                      "http://127.0.0.1:9/x"]) == 0
    settings = ServerSettings(data_dir=data, broker="none")
    app, ctx = build(settings)
    operator = {"Authorization": f"Bearer {create_token(ctx.store, 'operator')}"}
    with TestClient(app) as client:
        yield client, operator, settings


KEY = public_b64(generate_key().public_key())
BAD_BODIES = [
    ("/api/v1/devices", {"device_id": "d1", "public_key": KEY, "tags": ["a"]}, "tags"),
    ("/api/v1/devices", {"device_id": "d1", "public_key": KEY, "tags": "ab"}, "tags"),
    ("/api/v1/devices", {"device_id": "d1", "public_key": KEY, "tags": {"site": 3}}, "tags"),
    ("/api/v1/devices", {"device_id": 7, "public_key": KEY}, "device_id"),
    ("/api/v1/devices", [1], "JSON object"),
    ("/api/v1/enrollment-tokens", [1], "JSON object"),
    ("/api/v1/enrollment-tokens", {"tags": [1]}, "tags"),
    ("/api/v1/enrollment-tokens", {"ttl_seconds": "x"}, "ttl_seconds"),
    ("/api/v1/enrollment-tokens", {"ttl_seconds": 1e400}, "ttl_seconds"),  # JSON Infinity-sized
    ("/api/v1/enrollment-tokens", {"ttl_seconds": -5}, "ttl_seconds"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "bake_seconds": "x"}, "bake_seconds"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "max_per_minute": 1e400}, "max_per_minute"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "max_per_minute": 2.5}, "max_per_minute"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "thresholds": [1]}, "thresholds"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "thresholds": {"error_rate": "x"}},
     "error_rate"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "cohort": [1]}, "cohort"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "approve_stages": "x"}, "approve_stages"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "approve_stages": [9]}, "approve_stages"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "stages": [1, 2]}, "stages"),
    ("/api/v1/rollouts", {"model": "clinical"}, "version"),
    ("/api/v1/rollbacks", {"model": "clinical", "to": "1.0.0", "cohort": [1]}, "cohort"),
]


@pytest.mark.parametrize(("path", "body", "named"), BAD_BODIES, ids=[f"{p}-{n}-{i}" for i, (p, _, n) in
                                                                      enumerate(BAD_BODIES)])
def test_a_wrong_type_or_value_in_a_body_is_a_422_naming_the_field(api: Any, path: str, body: Any,
                                                                    named: str) -> None:
    client, operator, _ = api
    import json

    r = client.post(path, content=json.dumps(body), headers={**operator, "Content-Type": "application/json"})
    assert r.status_code == 422, (r.status_code, r.text)
    assert named in r.json()["detail"], r.json()


@pytest.mark.parametrize("request_", [
    ("GET", "/api/v1/alerts/99999999999999999999"),
    ("POST", "/api/v1/alerts/99999999999999999999/ack"),
    ("POST", "/api/v1/alerts/0/resolve"),
    ("GET", "/api/v1/quarantine?before=99999999999999999999"),
    ("GET", "/api/v1/quarantine?before=-1"),
])
def test_ids_past_sqlites_integer_range_are_a_422(api: Any, request_: tuple[str, str]) -> None:
    client, operator, _ = api
    method, url = request_
    r = client.request(method, url, headers=operator)
    assert r.status_code == 422, (r.status_code, r.text)


def test_the_database_is_owner_only_and_metrics_answer(api: Any) -> None:
    client, operator, settings = api
    assert client.post("/api/v1/enrollment-tokens", json={}, headers=operator).status_code == 200  # a write
    for f in settings.data_dir.glob("fleet.sqlite*"):
        assert f.stat().st_mode & 0o077 == 0, f"{f.name} is {oct(f.stat().st_mode & 0o777)}"
    r = client.get("/metrics")
    assert r.status_code == 200 and "edgefleet_alerts" in r.text and "edgefleet_ingest_received_total" in r.text
