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
    ("/api/v1/enrollment-tokens", {"ttl_seconds": 1e400}, "Infinity is not a JSON number"),  # json.dumps(inf)
    ("/api/v1/enrollment-tokens", {"ttl_seconds": -5}, "ttl_seconds"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "bake_seconds": "x"}, "bake_seconds"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "max_per_minute": 1e400}, "Infinity is not"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "max_per_minute": 2.5}, "max_per_minute"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "thresholds": [1]}, "thresholds"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "thresholds": {"error_rate": "x"}},
     "error_rate"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "cohort": [1]}, "cohort"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "approve_stages": "x"}, "approve_stages"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "approve_stages": [9]}, "approve_stages"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "stages": [50, 10]}, "stages"),
    ("/api/v1/rollouts", {"model": "clinical", "version": "1.0.0", "stages": ["10"]}, "stages"),
    ("/api/v1/rollouts", {"model": "clinical"}, "version"),
    ("/api/v1/rollbacks", {"model": "clinical", "to": "1.0.0", "cohort": [1]}, "cohort"),
    # "false" is a string: never taken for true (it replaced a revoked device's key)
    ("/api/v1/devices", {"device_id": "d1", "public_key": KEY, "replace": "false"},
     "replace must be true or false, not 'false'"),
    ("/api/v1/devices", {"device_id": "d1", "public_key": KEY, "tgas": {"a": "b"}}, "unknown field tgas"),
    ("/api/v1/enrollment-tokens", {"ttl": 5}, "unknown field ttl (did you mean ttl_seconds?)"),
    ("/api/v1/enroll", {"token": "t", "device_id": "d1", "public_key": KEY, "tags": {}}, "unknown field tags"),
    ("/api/v1/devices/d1/revoke", {"reason": "lost", "by": "me"}, "unknown field by"),
    ("/api/v1/devices", {"device_id": "d1", "public_key": KEY, "tags": {"a": float("nan")}},
     "NaN is not a JSON number"),
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


@pytest.mark.parametrize("path", ["/api/v1/enroll", "/api/v1/devices", "/api/v1/rollouts", "/api/v1/summaries"])
def test_a_small_deeply_nested_body_is_a_422_not_a_500(api: Any, path: str) -> None:
    client, operator, _ = api
    r = client.post(path, content=b"[" * 5000 + b"]" * 5000, headers=operator)
    assert r.status_code == 422 and "nest" in r.text, (r.status_code, r.text)  # summaries: the ingest result
    assert client.get("/healthz").status_code == 200


def test_a_revoked_device_is_not_reinstated_by_a_string_replace(api: Any) -> None:
    client, operator, _ = api
    assert client.post("/api/v1/devices", json={"device_id": "d1", "public_key": KEY}, headers=operator).is_success
    assert client.post("/api/v1/devices/d1/revoke", json={"reason": "lost"}, headers=operator).is_success
    new_key = public_b64(generate_key().public_key())
    for replace in ("false", "true", 1):
        r = client.post("/api/v1/devices", json={"device_id": "d1", "public_key": new_key, "replace": replace},
                        headers=operator)
        assert r.status_code == 422, r.text
    r = client.post("/api/v1/devices", json={"device_id": "d1", "public_key": new_key, "replace": False},
                    headers=operator)
    assert r.status_code == 409
    assert client.get("/api/v1/devices/d1", headers=operator).json()["revoked"] is not None


@pytest.mark.parametrize(("method", "url", "status", "error", "detail"), [
    ("GET", "/api/v1/nothing-here", 404, "not_found", "no route /api/v1/nothing-here"),
    ("DELETE", "/api/v1/devices", 405, "method_not_allowed", "DELETE is not allowed on /api/v1/devices"),
    ("GET", "/api/v1/alerts/abc", 422, "invalid_request", "path alert_id: "),
    ("GET", "/api/v1/devices?limit=0", 422, "invalid_request", "query limit: "),
    ("GET", "/healthz?strict=perhaps", 422, "invalid_request", "query strict: "),
])
def test_every_error_answer_has_the_one_shape(api: Any, method: str, url: str, status: int, error: str,
                                             detail: str) -> None:
    client, operator, _ = api
    r = client.request(method, url, headers=operator)
    body = r.json()
    assert (r.status_code, body["error"]) == (status, error) and body["detail"].startswith(detail), r.text
    assert isinstance(body["detail"], str)


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


def test_the_bearer_scheme_is_case_insensitive_and_a_401_names_it(api: Any) -> None:
    client, operator, _ = api
    token = operator["Authorization"].split()[1]
    for header in (f"bearer {token}", f"BEARER  {token}", f"Bearer {token}"):
        assert client.get("/api/v1/devices", headers={"Authorization": header}).status_code == 200, header
    for header in ("", "Bearer", "Basic dXNlcjpwYXNz", f"Token {token}"):
        r = client.get("/api/v1/devices", headers={"Authorization": header})
        assert r.status_code == 401 and r.headers["www-authenticate"] == 'Bearer realm="edgefleet"', header
        assert r.json()["error"] == "unauthenticated"


def test_alerts_of_an_unknown_model_are_a_404_naming_the_models(api: Any) -> None:
    client, operator, _ = api
    assert client.get("/api/v1/alerts", params={"model": "clinical"}, headers=operator).json() == []
    r = client.get("/api/v1/alerts", params={"model": "clinicl"}, headers=operator)
    assert r.status_code == 404 and r.json()["detail"] == "unknown model 'clinicl'; known: clinical"


def test_a_rollouts_stages_may_be_a_list_as_the_document_says(api: Any) -> None:
    client, operator, _ = api
    r = client.post("/api/v1/rollouts", json={"model": "clinical", "version": "1.0.0", "stages": [10, 100]},
                    headers=operator)
    assert r.status_code == 200 and r.json()["stages"] == [10, 100], r.text
