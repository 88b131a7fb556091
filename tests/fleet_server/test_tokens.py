"""Token administration from the data folder: list (ids, roles, states; never secrets), revoke by id or by the
leaked value, effective on the next request of a running server, recorded as events."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleet_server.app import create_app
from fleet_server.auth import create_token, list_tokens, revoke_token, token_id
from fleet_server.cli import main as fleet_cli
from fleet_server.errors import NotFoundError
from fleet_server.retraining import events
from fleet_server.settings import ServerSettings
from fleet_server.store import Store
from tests.support import expired_token


@pytest.fixture()
def folder(built: Any, tmp_path: Path) -> tuple[str, Store]:
    data = tmp_path / "server"
    assert fleet_cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub")]) == 0
    return str(data), Store(ServerSettings(data_dir=data).db_path)


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_a_revoked_token_is_refused_on_the_next_request_and_the_others_keep_working(
        folder: tuple[str, Store], capsys: pytest.CaptureFixture[str]) -> None:
    data, store = folder
    assert fleet_cli(["tokens", "create", "--data", data, "--role", "operator", "--name", "ci-bot"]) == 0
    out = capsys.readouterr()
    leaked, tid = out.out.strip(), token_id(store, out.out.strip())
    assert tid is not None and f"id {tid}" in out.err and f"tokens revoke {tid}" in out.err
    other = create_token(store, "viewer", name="wall-screen")
    client = TestClient(create_app(ServerSettings(data_dir=Path(data)), store))
    assert client.get("/api/v1/devices", headers=_auth(leaked)).status_code == 200

    assert fleet_cli(["tokens", "revoke", tid, "--data", data]) == 0
    assert f"token {tid} (operator, ci-bot) is revoked" in capsys.readouterr().out
    r = client.get("/api/v1/devices", headers=_auth(leaked))  # the running app: no restart, no cache
    assert r.status_code == 401 and r.json()["detail"] == "token revoked"
    assert client.get("/api/v1/devices", headers=_auth(other)).status_code == 200

    assert fleet_cli(["tokens", "list", "--data", data, "--json"]) == 0
    listed = {t["id"]: t for t in json.loads(capsys.readouterr().out)}
    assert listed[tid]["state"] == "revoked" and listed[tid]["name"] == "ci-bot"
    assert listed[token_id(store, other)]["state"] == "active"  # type: ignore[index]
    assert leaked not in json.dumps(listed)  # secrets are never listed (only their hashes are stored)


def test_revoking_by_the_leaked_value_and_twice_records_one_event(folder: tuple[str, Store]) -> None:
    data, store = folder
    leaked = create_token(store, "admin", name="laptop")
    tid = token_id(store, leaked)
    assert revoke_token(store, leaked)["state"] == "revoked"  # only the value was known
    assert revoke_token(store, str(tid))["state"] == "revoked"  # again: nothing changes
    evs = [e for e in events(store, "token") if e["subject"] == tid]
    assert [e["detail"]["action"] for e in evs] == ["revoked", "created"]  # newest first; one revocation
    assert evs[0]["detail"]["role"] == "admin" and evs[0]["detail"]["by"] == "cli"


def test_unknown_tokens_and_states(folder: tuple[str, Store], capsys: pytest.CaptureFixture[str]) -> None:
    data, store = folder
    with pytest.raises(NotFoundError, match="no token with id 'nope'"):
        revoke_token(store, "nope")
    with pytest.raises(NotFoundError, match="no token with that token value"):
        revoke_token(store, "eft_not-a-real-one")
    assert fleet_cli(["tokens", "revoke", "nope", "--data", data]) == 1
    assert "tokens list" in capsys.readouterr().err
    expired_token(store, "viewer", name="old")
    assert fleet_cli(["tokens", "list", "--data", data]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.endswith("old") or " old " in x)
    assert "expired" in line and "viewer" in line
    assert [t["state"] for t in list_tokens(store)] == ["expired"]
