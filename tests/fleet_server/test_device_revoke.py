"""Revoking a lost or stolen device: its messages are refused from the next batch on (in the validator
processes too), quarantined as ``device_revoked`` and counted; what it sent before stays; rollouts stop
targeting it; it comes back only through an operator's enroll with a new key."""

from __future__ import annotations

import json
from typing import Any

import pytest

from edgefleet_contracts.signing import generate_key, public_b64
from fleet_server import devices
from fleet_server.auth import create_token
from fleet_server.cli import main as fleet_cli
from fleet_server.errors import ConflictError
from fleet_server.retraining import events
from fleet_server.rollouts import service

from .conftest import Fleet
from .test_ingest import Http, metric, post


def _auth(store: Any, role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {create_token(store, role, name=f'{role}-1')}"}


def test_a_revoked_device_is_refused_quarantined_and_counted_and_the_others_go_on(http: Http) -> None:
    client, fleet, _ = http
    d1, d2 = fleet["dev-1"], fleet["dev-2"]
    assert post(client, d1.message([1, 2])).json()["accepted"] == 2
    viewer, operator = _auth(fleet.store, "viewer"), _auth(fleet.store, "operator")
    r = client.post("/api/v1/devices/dev-1/revoke", json={"reason": "stolen from ward 3"}, headers=viewer)
    assert r.status_code == 403
    r = client.post("/api/v1/devices/dev-1/revoke", json={}, headers=operator)
    assert r.status_code == 422 and "reason" in r.json()["detail"]
    r = client.post("/api/v1/devices/dev-1/revoke", json={"reason": "stolen from ward 3"}, headers=operator)
    assert r.status_code == 200 and r.json()["state"] == "revoked", r.text
    assert r.json()["revoked_reason"] == "stolen from ward 3"

    out = post(client, d1.message([3]))  # signed with its (stolen) enrolled key: refused all the same
    assert out.json()["accepted"] == 0 and out.json()["rejected"][0]["reason"] == "device_revoked", out.text
    assert "was revoked by an operator" in out.json()["rejected"][0]["detail"]
    assert post(client, d2.message([1])).json()["accepted"] == 1  # the others go on
    assert fleet.seqs("dev-1") == [1, 2]  # what it sent before stays
    assert len(fleet.quarantined("device_revoked")) == 1
    assert metric(client, 'edgefleet_ingest_rejected_total{reason="device_revoked"}') == 1
    shown = client.get("/api/v1/devices/dev-1", headers=viewer).json()
    assert shown["state"] == "revoked" and shown["revoked"] is not None
    ev = [e for e in events(fleet.store, "device") if e["subject"] == "dev-1"]
    assert ev[0]["detail"] == {"action": "revoked", "reason": "stolen from ward 3", "by": "api:operator-1"}
    # Revoking again changes nothing (one event)
    assert client.post("/api/v1/devices/dev-1/revoke", json={"reason": "again"}, headers=operator).status_code == 200
    assert len([e for e in events(fleet.store, "device") if e["subject"] == "dev-1"]) == 1
    assert devices.get(fleet.store, "dev-1")["revoked_reason"] == "stolen from ward 3"


def test_it_comes_back_only_through_an_operator_enroll_with_a_new_key(http: Http) -> None:
    client, fleet, _ = http
    d1 = fleet["dev-1"]
    devices.revoke(fleet.store, "dev-1", "lost", "test")
    old_key = public_b64(d1.key.public_key())
    token = devices.create_enrollment_token(fleet.store)
    r = client.post("/api/v1/enroll", json={"token": token, "device_id": "dev-1", "public_key": old_key})
    assert r.status_code == 409 and "was revoked" in r.json()["detail"]  # a thief with a token: refused
    assert fleet.store.one("SELECT used_by FROM enrollment_tokens")[0] is None  # type: ignore[index]
    for replace in (False, True):  # without replace, or with the revoked key: refused
        try:
            devices.enroll(fleet.store, fleet.settings.fleet, "dev-1", old_key, replace=replace)
            raise AssertionError("enrolled a revoked device")
        except ConflictError as exc:
            assert "revoked" in str(exc)
    new_key = generate_key()
    doc = devices.enroll(fleet.store, fleet.settings.fleet, "dev-1", public_b64(new_key.public_key()), replace=True)
    assert doc["state"] == "active" and doc["revoked"] is None
    assert post(client, d1.message([5], signer=new_key)).json()["accepted"] == 1
    assert post(client, d1.message([6])).json()["rejected"][0]["reason"] == "bad_signature"  # the old key
    actions = [e["detail"]["action"] for e in events(fleet.store, "device") if e["subject"] == "dev-1"]
    assert actions == ["reinstated", "revoked"]


def test_rollouts_do_not_target_a_revoked_device_and_its_desired_state_is_to_be_cleared(fleet: Fleet) -> None:
    store = fleet.store
    with store.write() as c:
        c.execute("INSERT INTO desired VALUES ('dev-1', 1, 'clinical', '1.0.0', 'r-x', '{}', 0, 0)")
    assert [d for d, _ in service._devices(store)] == ["dev-1", "dev-2"]
    devices.revoke(store, "dev-2", "retired", "test")
    assert [d for d, _ in service._devices(store)] == ["dev-1"]  # stages, cohorts and control groups read this
    devices.revoke(store, "dev-1", "stolen", "test")
    rows = [tuple(r) for r in store.query("SELECT device_id, seq, envelope, published FROM desired")]
    assert rows == [("dev-1", 2, "", 0)]  # an empty retained message to publish: it clears the broker's copy
    assert service._devices(store) == []


def test_the_cli_revokes_and_lists_it(fleet: Fleet, capsys: Any) -> None:
    data = str(fleet.settings.data_dir)
    (fleet.settings.data_dir / "server.toml").write_text(f'fleet = "{fleet.settings.fleet}"\n')
    assert fleet_cli(["devices", "revoke", "dev-2", "--data", data, "--reason", "water damage"]) == 0
    assert "revoked dev-2: water damage" in capsys.readouterr().out
    assert fleet_cli(["devices", "list", "--data", data]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(x.startswith("dev-2") and x.endswith("REVOKED") for x in lines)
    assert any(x.startswith("dev-1") and not x.endswith("REVOKED") for x in lines)
    assert fleet_cli(["devices", "revoke", "nope", "--data", data, "--reason", "x"]) == 1


def test_a_device_enrolled_again_with_a_new_key_has_its_first_windows_stored_not_taken_for_replays(
        http: Http) -> None:
    """Found in review: the replacement device (provisioned fresh, so counting from seq 1 again) had its first
    windows acknowledged as duplicates of the old device's and dropped."""
    client, fleet, _ = http
    d1 = fleet["dev-1"]
    assert post(client, d1.message([1, 2, 3])).json()["accepted"] == 3
    devices.revoke(fleet.store, "dev-1", "stolen", "test")
    new_key = generate_key()
    devices.enroll(fleet.store, fleet.settings.fleet, "dev-1", public_b64(new_key.public_key()), replace=True)
    out = post(client, d1.message([1, 2], signer=new_key, count=77)).json()
    assert (out["accepted"], out["duplicates"]) == (2, 0), out
    rows = fleet.store.query("SELECT seq, count, body FROM summaries WHERE device_id = 'dev-1' ORDER BY seq")
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5]  # the new generation after the old one, in order
    assert [json.loads(r["body"])["seq"] for r in rows] == [1, 2, 3, 1, 2]  # bodies as the devices signed them
    assert [r["count"] for r in rows][3:] == [77, 77]
    again = post(client, d1.message([2], signer=new_key, count=77)).json()  # a real replay is still one
    assert (again["accepted"], again["duplicates"]) == (0, 1), again
    assert len(fleet.seqs("dev-1")) == 5
    # A plain key replacement (no revocation) starts a generation too; the same key again does not
    newer = generate_key()
    devices.enroll(fleet.store, fleet.settings.fleet, "dev-1", public_b64(newer.public_key()), replace=True)
    devices.enroll(fleet.store, fleet.settings.fleet, "dev-1", public_b64(newer.public_key()), replace=True)
    assert post(client, d1.message([1], signer=newer)).json()["accepted"] == 1
    assert fleet.seqs("dev-1")[-1] == 6


def test_another_spelling_of_the_revoked_key_is_still_the_revoked_key(fleet: Fleet) -> None:
    import base64

    raw = base64.b64decode(public_b64(fleet["dev-1"].key.public_key()))
    canonical = base64.b64encode(raw).decode()
    # the last base64 digit carries 2 unused bits: set one and the same 32 bytes decode from another text
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = canonical[-2]
    other = canonical[:-2] + alphabet[alphabet.index(last) ^ 1] + canonical[-1]
    assert other != canonical and base64.b64decode(other, validate=True) == raw
    devices.revoke(fleet.store, "dev-1", "stolen", "test")
    with pytest.raises(ConflictError, match="revoked with this key"):
        devices.enroll(fleet.store, fleet.settings.fleet, "dev-1", other, replace=True)
