"""The OpenAPI document (fleet_server/openapi.py) says what the routes do: the bearer scheme where a token is
needed, each hand-read request body with exactly the fields the route accepts, and the statuses the routes
answer (each real answer below must be listed for its operation). Real app, real data folder, real requests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet_contracts.signing import generate_key, public_b64
from fleet_server.auth import create_token
from fleet_server.cli import main as fleet_cli
from fleet_server.openapi import BODIES
from fleet_server.rollouts import params
from fleet_server.rollouts.routes import ROLLBACK_FIELDS
from fleet_server.server import build
from fleet_server.settings import ServerSettings


@pytest.fixture()
def api(built: Any, tmp_path: Any) -> Iterator[tuple[TestClient, dict[str, str], dict[str, Any]]]:
    data = tmp_path / "server"
    assert fleet_cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub")]) == 0
    assert fleet_cli(["models", "publish", str(built.package), "--data", str(data), "--owner", "ml", "--oncall",
                      "http://127.0.0.1:9/x"]) == 0
    app, ctx = build(ServerSettings(data_dir=data, broker="none"))
    operator = {"Authorization": f"Bearer {create_token(ctx.store, 'operator')}"}
    with TestClient(app) as client:
        yield client, operator, client.get("/openapi.json").json()


def _op(doc: dict[str, Any], method: str, path: str) -> dict[str, Any]:
    op: dict[str, Any] = doc["paths"][path][method]
    return op


def test_token_routes_declare_the_bearer_scheme_not_a_header_parameter(api: Any) -> None:
    client, _, doc = api
    assert doc["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer",
        "description": "a token from `fleet-server tokens create --role viewer|operator|admin`"}
    secured = {(m, p) for p, ops in doc["paths"].items() for m, op in ops.items() if "security" in op}
    open_ = {(m, p) for p, ops in doc["paths"].items() for m, op in ops.items() if "security" not in op}
    assert ("get", "/api/v1/devices") in secured and ("post", "/api/v1/rollouts") in secured
    assert open_ == {("get", "/healthz"), ("get", "/metrics"), ("post", "/api/v1/enroll"),
                     ("post", "/api/v1/summaries"), ("get", "/packages/{name}/{version}"),
                     ("head", "/packages/{name}/{version}")}
    for method, path in sorted(secured):
        op = _op(doc, method, path)
        assert not any(p["name"].lower() == "authorization" for p in op.get("parameters", [])), (method, path)
        assert {"401", "403"} <= set(op["responses"]), (method, path)
    # and the routes do refuse a request without one
    assert client.get("/api/v1/devices").status_code == 401
    assert "HTTPValidationError" not in json.dumps(doc)


@pytest.mark.parametrize(("method", "path"), [k for k, v in BODIES.items() if v[1]])
def test_a_documented_body_lists_exactly_the_fields_the_route_accepts(api: Any, method: str, path: str) -> None:
    client, operator, doc = api
    schema = _op(doc, method, path)["requestBody"]["content"]["application/json"]["schema"]
    fields = set(schema["properties"])
    assert schema["additionalProperties"] is False and set(schema.get("required", [])) <= fields
    url = path.replace("{device_id}", "dev-1")
    # a field the document does not list is refused by name...
    r = client.request(method.upper(), url, json={"zz_unlisted": 1}, headers=operator)
    assert r.status_code == 422 and "unknown field zz_unlisted" in r.json()["detail"], r.text
    # ...and none it lists is
    r = client.request(method.upper(), url, json=dict.fromkeys(fields, None), headers=operator)
    assert "unknown field" not in r.text, r.text
    if path == "/api/v1/rollouts":
        assert fields == set(params.START_FIELDS)
    if path == "/api/v1/rollbacks":
        assert fields == set(ROLLBACK_FIELDS)


def test_the_statuses_the_routes_answer_are_documented(api: Any, built: Any) -> None:
    client, operator, doc = api
    key, other = (public_b64(generate_key().public_key()) for _ in range(2))
    seen: list[tuple[str, str, int]] = []

    def call(method: str, template: str, url: str | None = None, **kw: Any) -> Any:
        r = client.request(method, url or template, **kw)
        seen.append((method.lower(), template, r.status_code))
        return r

    call("POST", "/api/v1/devices", json={"device_id": "dev-1", "public_key": key}, headers=operator)
    call("POST", "/api/v1/devices", json={"device_id": "dev-1", "public_key": other}, headers=operator)  # 409
    call("POST", "/api/v1/devices", content=b"[" * 3000, headers=operator)  # 422
    call("GET", "/api/v1/devices/{device_id}", "/api/v1/devices/nobody", headers=operator)  # 404
    call("POST", "/api/v1/enroll", json={"token": "efe_nope", "device_id": "dev-2", "public_key": key})  # 401
    call("POST", "/api/v1/rollouts", json={"model": "clinical", "version": "1.0.0"}, headers=operator)
    call("POST", "/api/v1/rollouts", json={"model": "clinical", "version": "1.0.0"}, headers=operator)  # 409
    call("POST", "/api/v1/summaries", content=b"{}")  # 422, every envelope rejected
    call("GET", "/api/v1/devices", "/api/v1/devices?limit=0", headers=operator)  # 422
    call("GET", "/api/v1/devices", "/api/v1/devices", headers={"Authorization": "Bearer eft_x"})  # 401
    viewer = {"Authorization": f"Bearer {create_token(client.app.state.ctx.store, 'viewer')}"}
    call("POST", "/api/v1/devices", json={"device_id": "d9", "public_key": key}, headers=viewer)  # 403
    pkg = "/packages/{name}/{version}"
    length = len(built.package.read_bytes())
    call("GET", pkg, "/packages/clinical/1.0.0")
    call("GET", pkg, "/packages/clinical/1.0.0", headers={"Range": "bytes=0-9"})  # 206
    call("GET", pkg, "/packages/clinical/1.0.0", headers={"Range": f"bytes={length}-"})  # 416
    call("GET", pkg, "/packages/clinical/9.9.9")  # 404
    call("HEAD", pkg, "/packages/clinical/1.0.0", headers={"Range": "bytes=0-9"})  # 206

    assert {s for _, _, s in seen} >= {200, 206, 401, 403, 404, 409, 416, 422}
    for method, path, status in seen:
        assert str(status) in _op(doc, method, path)["responses"], (method, path, status)
    summaries = _op(doc, "post", "/api/v1/summaries")["responses"]
    assert summaries["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/IngestResult"}
