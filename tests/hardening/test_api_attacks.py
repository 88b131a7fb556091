"""API attacks against a real fleet server process (uvicorn on loopback): missing, malformed, unknown,
expired tokens (401); a viewer trying every operator action (403); oversized bodies, with and without a
Content-Length (413). Each refusal names the problem, and the server's state (devices, enrollment tokens,
tokens, rollouts, alert rules, model versions) is unchanged afterwards.

Publishing a model and creating operator tokens have no HTTP route at all (CLI only, with access to the data
folder): a POST there is 405 for every role, which the last test pins.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from edgefleet_contracts.signing import generate_key, public_b64
from fleet_server.store import Store
from tests.brokers import Mosquitto
from tests.support import expired_token

from .server_proc import ServerProcess

MAX_BODY = 16 * 1024 * 1024
TABLES = ("devices", "enrollment_tokens", "tokens", "rollouts", "rollout_decisions", "desired", "models",
          "model_versions", "alerts")


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, built: Any) -> Iterator[dict[str, Any]]:
    folder = tmp_path_factory.mktemp("api-attacks")
    broker = Mosquitto(folder / "mosquitto").start()
    server = ServerProcess.create(folder, broker, built).start()
    store = Store(server.data / "fleet.sqlite")
    try:
        expired = expired_token(store, "admin")
        with server.client("operator") as c:
            r = c.post("/api/v1/rollouts", json={"model": "clinical", "version": "1.0.0", "stages": "10,100"})
            assert r.status_code == 200, r.text
            rid = r.json()["id"]
            # paused, so that the rollout engine's own ticks leave the tables alone during the comparisons
            assert c.post(f"/api/v1/rollouts/{rid}/pause").json()["state"] == "paused"
        yield {"server": server, "expired": expired, "rollout": rid}
    finally:
        store.close()
        server.stop()
        broker.close()


def state(s: ServerProcess) -> dict[str, Any]:
    """Every row of the tables an operator action could change (hashed), for before/after comparison."""
    return {t: hashlib.sha256(repr(s.db(f"SELECT * FROM {t} ORDER BY rowid")).encode()).hexdigest() for t in TABLES}


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# ---- 401 ------------------------------------------------------------------------------------------------
CREDENTIALS: dict[str, tuple[Any, str]] = {
    "missing token": (lambda a: {}, "missing bearer token (Authorization: Bearer <token>"),
    "not a bearer token": (lambda a: {"Authorization": "Basic YWRtaW46YWRtaW4="}, "missing bearer token"),
    "SQL in the token": (lambda a: {"Authorization": "Bearer ' OR 1=1 --"}, "unknown token"),
    "wrong token": (lambda a: _auth("eft_" + "A" * 43), "unknown token"),
    "a token's hash instead of the token": (
        lambda a: _auth(hashlib.sha256(a["server"].tokens["admin"].encode()).hexdigest()), "unknown token"),
    "expired token": (lambda a: _auth(a["expired"]), "token expired"),
}
READS = ["/api/v1/devices", "/api/v1/models", "/api/v1/rollouts", "/api/v1/quarantine", "/api/v1/alerts"]


@pytest.mark.parametrize("case", list(CREDENTIALS))
def test_bad_credentials_get_401_saying_what_is_wrong_on_every_route(api, case):
    s: ServerProcess = api["server"]
    headers, detail = CREDENTIALS[case]
    before = state(s)
    with httpx.Client(base_url=s.url, timeout=30, headers=headers(api)) as c:
        answers = [c.get(path) for path in READS]
        answers.append(c.post("/api/v1/devices", json={"device_id": "intruder",
                                                       "public_key": public_b64(generate_key().public_key())}))
        answers.append(c.post(f"/api/v1/rollouts/{api['rollout']}/abort"))
    for r in answers:
        assert r.status_code == 401, (r.request.url, r.text)
        assert r.json()["error"] == "unauthenticated" and detail in r.json()["detail"], r.text
    assert state(s) == before


# ---- 403 ------------------------------------------------------------------------------------------------
def _operator_actions(a: dict[str, Any]) -> dict[str, tuple[str, str, Any]]:
    rid = a["rollout"]
    key = public_b64(generate_key().public_key())
    return {
        "create a rollout": ("POST", "/api/v1/rollouts", {"model": "clinical", "version": "1.0.0"}),
        "pause a rollout": ("POST", f"/api/v1/rollouts/{rid}/pause", None),
        "resume a rollout": ("POST", f"/api/v1/rollouts/{rid}/resume", None),
        "approve a stage": ("POST", f"/api/v1/rollouts/{rid}/approve", None),
        "abort a rollout": ("POST", f"/api/v1/rollouts/{rid}/abort", None),
        "roll a cohort back": ("POST", "/api/v1/rollbacks", {"model": "clinical", "to": "1.0.0"}),
        "create an enrollment token": ("POST", "/api/v1/enrollment-tokens", {"tags": {"site": "x"}}),
        "enroll a device": ("POST", "/api/v1/devices", {"device_id": "rogue", "public_key": key}),
        "re-key an enrolled device": ("POST", "/api/v1/devices", {"device_id": "dev-a", "public_key": key,
                                                                   "replace": True}),
        "retag a device": ("PUT", "/api/v1/devices/dev-a/tags", {"site": "elsewhere"}),
        "change alert rules": ("PUT", "/api/v1/models/clinical/alert-rules", {"enabled": {"input_drift": False}}),
        "acknowledge an alert": ("POST", "/api/v1/alerts/1/ack", None),
        "resolve an alert": ("POST", "/api/v1/alerts/1/resolve", None),
    }


ACTIONS = list(_operator_actions({"rollout": "r"}))


@pytest.mark.parametrize("action", ACTIONS)
def test_a_viewer_is_refused_every_operator_action_with_403_and_nothing_changes(api, action):
    s: ServerProcess = api["server"]
    method, path, body = _operator_actions(api)[action]
    before = state(s)
    with s.client("viewer") as c:
        r = c.request(method, path, json=body)
        assert r.status_code == 403, r.text
        assert r.json() == {"error": "forbidden", "detail": "role 'viewer' may not do this; it needs 'operator'"}
        assert c.get(f"/api/v1/rollouts/{api['rollout']}").json()["state"] == "paused"  # reads still work
    assert state(s) == before


def test_the_operator_may_do_what_the_viewer_may_not(api):
    """Control: the 403s above come from the role, not from a broken route."""
    s: ServerProcess = api["server"]
    with s.client("operator") as c:
        r = c.post("/api/v1/enrollment-tokens", json={"tags": {"site": "x"}})
        assert r.status_code == 200 and r.json()["token"]
        assert c.put("/api/v1/devices/dev-b/tags", json={"site": "b"}).status_code == 200


# ---- 413 ------------------------------------------------------------------------------------------------
def _chunks(total: int, size: int = 1 << 20) -> Iterator[bytes]:
    sent = 0
    while sent < total:
        yield b" " * min(size, total - sent)
        sent += size


OVERSIZED: dict[str, tuple[str | None, str, bool]] = {
    # name: (role, path, chunked: no Content-Length)
    "operator route, 17 MB with Content-Length": ("operator", "/api/v1/devices", False),
    "operator route, 40 MB chunked": ("operator", "/api/v1/devices", True),
    "unauthenticated self-enrollment, 17 MB with Content-Length": (None, "/api/v1/enroll", False),
    "unauthenticated self-enrollment, 40 MB chunked": (None, "/api/v1/enroll", True),
    "summary ingest, 40 MB chunked": (None, "/api/v1/summaries", True),
}


@pytest.mark.parametrize("case", list(OVERSIZED))
def test_an_oversized_body_gets_413_and_is_not_buffered_whole(api, case):
    s: ServerProcess = api["server"]
    role, path, chunked = OVERSIZED[case]
    before = state(s)
    content: Any = _chunks(40 << 20) if chunked else b" " * (MAX_BODY + (1 << 20))
    with s.client(role) as c:
        try:
            r = c.post(path, content=content, headers={"Content-Type": "application/json"})
        except httpx.RemoteProtocolError:  # the server may close the connection after answering early
            pytest.fail("the server closed the connection without an answer")
    assert r.status_code == 413, r.text
    doc = r.json()
    reasons = {doc.get("error")} | {x["reason"] for x in doc.get("rejected", [])}
    assert "too_large" in reasons, doc
    assert s.alive() and state(s) == before


# ---- routes that do not exist over HTTP ----------------------------------------------------------------------
@pytest.mark.parametrize("path", ["/api/v1/models", "/api/v1/tokens"])
def test_publishing_models_and_creating_tokens_are_not_possible_over_http(api, path):
    s: ServerProcess = api["server"]
    before = state(s)
    for role in ("viewer", "operator", "admin"):
        with s.client(role) as c:
            r = c.post(path, json={"role": "admin", "package": "x"})
            assert r.status_code in (404, 405), (role, r.status_code, r.text)
    assert state(s) == before
