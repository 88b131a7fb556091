"""Rollouts and rollbacks judge their version as a device holding the server's newest keyset would: a version
published before the server learnt of a keyset that revokes its signing key is refused up front (service, API and
CLI), a running rollout whose version becomes untrusted pauses before it moves another device, and the reverts an
operator recovers with (abort, automatic rollback) still go back to an untrusted previous version, with a warning.

Real packages built by the packager: ``clinical 1.0.0`` (the session's package, signed by K1, carrying keyset v1)
and ``clinical 1.2.0`` (signed by K2 after a rotation, carrying keyset v3, which revokes K1)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edgefleet_contracts.errors import ExpiredError, RevokedKeyError
from edgefleet_contracts.signing import generate_key, key_id, public_b64
from fleet_server import devices as devmod
from fleet_server.auth import create_token
from fleet_server.cli import main as fleet_cli
from fleet_server.errors import ConfigError, NotFoundError
from fleet_server.registry import judge_published, publish
from fleet_server.rollouts import service
from fleet_server.rollouts.routes import attach_rollouts
from fleet_server.settings import ServerSettings
from fleet_server.store import Store
from model_packager.build import BuildRequest, build_package
from model_packager.keys import KeyFolder, revoke_key, rotate_keys
from tests.fleet_server.conftest import Fleet, run_cli

OWNER = {"owner": "clinical-ml", "oncall": "http://127.0.0.1:9/page"}
DEVICES = [f"dev-{i}" for i in range(4)]


@dataclass(frozen=True)
class Signed:
    k1: str  # key id of K1, which signed the session's clinical 1.0.0 and which keyset v3 revokes
    v120: Path  # clinical 1.2.0, signed by K2, carrying keyset v3


@pytest.fixture(scope="module")
def signed(built: Any, tmp_path_factory: pytest.TempPathFactory) -> Signed:
    root = tmp_path_factory.mktemp("rollout-trust")
    keys = root / "keys"
    shutil.copytree(built.keys, keys)
    k1 = key_id(KeyFolder(keys).signing_key()[0].public_key())
    rotate_keys(keys)
    assert revoke_key(keys, k1[:12]).version == 3
    out = root / "clinical-1.2.0.efpkg"
    build_package(BuildRequest(model=built.model, name="clinical", version="1.2.0", target="x86_64-avx2",
                               calibration=built.calibration, holdout=built.holdout, keys=keys, out=out,
                               quantize="none", owner="clinical-ml", latency_runs=10))
    return Signed(k1, out)


@dataclass
class Server:
    settings: ServerSettings
    store: Store
    signer: service.DesiredSigner

    def publish(self, pkg: Path) -> dict[str, Any]:
        return publish(self.store, self.settings.packages_dir, self.settings.root_pub, pkg, **OWNER)

    def report(self, dev: str, active: str | None, last: dict[str, Any] | None = None,
               standby: str | None = None) -> None:
        rep = {"active": {"name": "clinical", "version": active} if active else None,
               "standby": {"name": "clinical", "version": standby} if standby else None,
               "update_state": "idle", "last_result": last or {"status": "installed", "version": active}}
        with self.store.write() as c:
            c.execute("UPDATE devices SET reported = ?, last_seen = ? WHERE device_id = ?",
                      (json.dumps(rep), time.time(), dev))

    def forget(self, dev: str) -> None:
        """As if ``dev`` never reported: a rollback cannot know what it holds, so it would download."""
        with self.store.write() as c:
            c.execute("UPDATE devices SET reported = NULL WHERE device_id = ?", (dev,))

    def desired(self) -> dict[str, str]:
        return {r["device_id"]: r["version"] for r in self.store.query("SELECT device_id, version FROM desired")}

    def rollouts(self) -> int:
        return int(self.store.one("SELECT COUNT(*) FROM rollouts")[0])

    def decisions(self, rid: str, kind: str) -> list[dict[str, Any]]:
        return [d for d in service.status(self.store, rid)["decisions"] if d["kind"] == kind]


def _server(built: Any, tmp_path: Path) -> Iterator[Server]:
    data = tmp_path / "server"
    assert fleet_cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub")]) == 0
    settings = ServerSettings(data_dir=data, broker="none")
    store = Store(settings.db_path)
    srv = Server(settings, store, service.DesiredSigner.from_settings(settings))
    for dev in DEVICES:
        devmod.enroll(store, "default", dev, public_b64(generate_key().public_key()), {"site": "a"})
    yield srv
    store.close()


@pytest.fixture()
def fresh(built: Any, tmp_path: Path) -> Iterator[Server]:
    """An initialised server with nothing published; four devices enrolled, nothing reported."""
    yield from _server(built, tmp_path)


@pytest.fixture()
def revoked(built: Any, signed: Signed, tmp_path: Path) -> Iterator[Server]:
    """1.0.0 published (K1 live: the server then holds keyset v1), then 1.2.0 (the server now holds keyset v3,
    which revokes K1); every device runs 1.0.0."""
    for srv in _server(built, tmp_path):
        srv.publish(built.package)
        assert srv.publish(signed.v120)["keyset_version"] == 3
        for dev in DEVICES:
            srv.report(dev, "1.0.0")
        yield srv


def _revoked_words(signed: Signed) -> str:
    return (f"devices refuse clinical 1.0.0: manifest is signed by key {signed.k1[:12]}.*, which keyset version 3 "
            "revokes \\(judged by keyset version 3, the newest this server has verified\\)")


# ---- the judgement -------------------------------------------------------------------------------------------
def test_a_published_version_is_judged_by_the_newest_keyset_the_server_has_verified_since(fresh, built, signed):
    srv = fresh
    packages, root = srv.settings.packages_dir, srv.settings.root_pub
    srv.publish(built.package)
    assert judge_published(srv.store, packages, root, "clinical", "1.0.0").keyset.version == 1
    srv.publish(signed.v120)  # carries keyset v3, which revokes 1.0.0's signing key
    with pytest.raises(RevokedKeyError, match=_revoked_words(signed)):
        judge_published(srv.store, packages, root, "clinical", "1.0.0")
    assert judge_published(srv.store, packages, root, "clinical", "1.2.0").keyset.version == 3
    later = datetime.now(UTC) + timedelta(days=3 * 365)  # past the keyset's, the key's and the package's expiry
    with pytest.raises(ExpiredError, match="devices refuse clinical 1.2.0: .*expired at"):
        judge_published(srv.store, packages, root, "clinical", "1.2.0", later)
    with pytest.raises(NotFoundError, match="clinical version 9.9.9 is not published"):
        judge_published(srv.store, packages, root, "clinical", "9.9.9")


# ---- refused up front ----------------------------------------------------------------------------------------
def test_a_rollout_of_a_version_signed_by_a_since_revoked_key_is_refused_and_creates_nothing(revoked, signed):
    srv = revoked
    with pytest.raises(RevokedKeyError, match="cannot start a rollout: " + _revoked_words(signed)) as caught:
        service.start(srv.store, model="clinical", version="1.0.0", cohort={}, stages=[100], bake_seconds=0)
    assert caught.value.reason == "revoked_key"
    assert srv.rollouts() == 0 and srv.desired() == {}


def test_a_rollback_to_a_version_signed_by_a_since_revoked_key_goes_only_where_no_download_is_needed(revoked, signed):
    """A rollback is how an operator recovers: devices holding the version in their standby slot switch back
    without verifying its signature again, so it goes ahead for them (with a warning); a device that would have to
    download it would refuse it, so then nothing is sent."""
    srv = revoked
    for dev in DEVICES:
        srv.report(dev, "1.2.0", standby="1.0.0")
    srv.forget(DEVICES[0])
    with pytest.raises(RevokedKeyError, match="cannot roll clinical back to 1.0.0: " + _revoked_words(signed)
                       + ".*1 device\\(s\\) would have to download it and refuse it"):
        service.rollback(srv.store, srv.signer, "clinical", "1.0.0", {}, "carol")
    assert srv.rollouts() == 0 and srv.desired() == {}
    srv.report(DEVICES[0], "1.2.0", standby="1.0.0")
    rid = service.rollback(srv.store, srv.signer, "clinical", "1.0.0", {}, "carol")
    assert srv.desired() == dict.fromkeys(DEVICES, "1.0.0")
    [warning] = srv.decisions(rid, "warning")
    assert "which devices no longer trust (revoked_key)" in warning["detail"]


def test_an_expired_version_is_refused_as_expired(revoked):
    srv = revoked
    later = (datetime.now(UTC) + timedelta(days=3 * 365)).timestamp()
    with pytest.raises(ExpiredError, match="cannot start a rollout: devices refuse clinical 1.2.0: .*expired at"):
        service.start(srv.store, model="clinical", version="1.2.0", cohort={}, stages=[100], bake_seconds=0,
                      now=later)
    with pytest.raises(ExpiredError, match="cannot roll clinical back to 1.2.0: devices refuse clinical 1.2.0"):
        service.rollback(srv.store, srv.signer, "clinical", "1.2.0", {}, "carol", now=later)
    assert srv.rollouts() == 0


def test_the_api_refuses_them_with_a_422_naming_the_reason_and_the_keyset(revoked, signed, start_app):
    srv = revoked
    client, _ = start_app(Fleet(srv.settings, srv.store), lambda app, ctx: attach_rollouts(app, ctx, publish=False))
    operator = {"Authorization": f"Bearer {create_token(srv.store, 'operator')}"}
    r = client.post("/api/v1/rollouts", json={"model": "clinical", "version": "1.0.0"}, headers=operator)
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "revoked_key"
    assert "clinical 1.0.0" in r.json()["detail"] and "keyset version 3" in r.json()["detail"]
    srv.forget(DEVICES[0])  # it would have to download 1.0.0
    r = client.post("/api/v1/rollbacks", json={"model": "clinical", "to": "1.0.0"}, headers=operator)
    assert (r.status_code, r.json()["error"]) == (422, "revoked_key")
    assert srv.rollouts() == 0
    r = client.post("/api/v1/rollouts", json={"model": "clinical", "version": "1.2.0"}, headers=operator)
    assert r.status_code == 200, r.text
    assert (r.json()["version"], r.json()["state"]) == ("1.2.0", "running")


def test_the_cli_refuses_them_in_one_line_with_exit_status_1(revoked, signed):
    d = str(revoked.settings.data_dir)
    rc, out, err = run_cli(["rollout", "start", "clinical", "1.0.0", "--data", d])
    assert (rc, out) == (1, "")
    assert err.startswith("fleet-server: REJECTED (revoked_key): cannot start a rollout: devices refuse clinical "
                          f"1.0.0: manifest is signed by key {signed.k1[:12]}")
    assert "keyset version 3" in err and err.count("\n") == 1
    revoked.forget(DEVICES[0])  # it would have to download 1.0.0
    rc, _, err = run_cli(["rollback", "clinical", "--to", "1.0.0", "--data", d])
    assert rc == 1 and err.startswith("fleet-server: REJECTED (revoked_key): cannot roll clinical back to 1.0.0: ")
    assert revoked.rollouts() == 0


# ---- what still works ----------------------------------------------------------------------------------------
def test_a_rollout_of_the_version_signed_by_the_live_key_moves_devices_and_warns_its_revert_target_is_refused(
        revoked):
    srv = revoked
    rid = service.start(srv.store, model="clinical", version="1.2.0", cohort={}, stages=[100], bake_seconds=0)
    service.RolloutService(srv.settings, srv.store).tick()
    assert srv.desired() == {dev: "1.2.0" for dev in DEVICES}
    st = service.status(srv.store, rid)
    assert (st["previous"], st["state"]) == ("1.0.0", "running")
    [warning] = srv.decisions(rid, "warning")
    assert warning["detail"].startswith("an abort or automatic rollback would send devices back to clinical 1.0.0 "
                                        "(revoked_key): devices refuse clinical 1.0.0")
    assert warning["evidence"] == {"version": "1.0.0", "reason": "revoked_key"}


def test_an_abort_still_sends_moved_devices_back_to_an_untrusted_previous_version_with_a_warning(revoked):
    srv = revoked
    rid = service.start(srv.store, model="clinical", version="1.2.0", cohort={}, stages=[100], bake_seconds=0)
    service.RolloutService(srv.settings, srv.store).tick()
    st = service.set_state(srv.store, srv.signer, rid, "abort", "bob")
    assert st["state"] == "aborted"
    assert srv.desired() == {dev: "1.0.0" for dev in DEVICES}
    assert any(w["detail"].startswith("the abort sends 4 device(s) back to clinical 1.0.0 (revoked_key)")
               for w in srv.decisions(rid, "warning"))


def test_an_automatic_rollback_still_sends_devices_back_to_an_untrusted_previous_version_with_a_warning(revoked):
    srv = revoked
    svc = service.RolloutService(srv.settings, srv.store)
    rid = service.start(srv.store, model="clinical", version="1.2.0", cohort={}, stages=[100], bake_seconds=0)
    svc.tick()
    for dev in DEVICES:  # every install failed: the install failure gate trips
        srv.report(dev, "1.0.0", {"status": "rejected", "reason": "smoke_test", "version": "1.2.0"})
    svc.tick()
    assert service.status(srv.store, rid)["state"] == "rolled_back"
    assert srv.desired() == {dev: "1.0.0" for dev in DEVICES}
    assert any(w["detail"].startswith("the automatic rollback sends 4 device(s) back to clinical 1.0.0 "
                                      "(revoked_key)") for w in srv.decisions(rid, "warning"))


def test_a_running_rollout_whose_version_is_revoked_meanwhile_pauses_before_moving_another_device(
        fresh, built, signed):
    srv = fresh
    srv.publish(built.package)
    svc = service.RolloutService(srv.settings, srv.store)
    t0 = time.time()
    rid = service.start(srv.store, model="clinical", version="1.0.0", cohort={}, stages=[100], bake_seconds=0,
                        max_per_minute=1, now=t0)
    svc.tick(now=t0 + 1)
    assert len(srv.desired()) == 1  # one device a minute
    srv.publish(signed.v120)  # the server learns keyset v3: 1.0.0's signing key is revoked
    svc.tick(now=t0 + 62)
    st = service.status(srv.store, rid)
    assert st["state"] == "paused" and len(srv.desired()) == 1
    [pause] = srv.decisions(rid, "pause")
    assert pause["actor"] == "engine" and pause["detail"].startswith("paused (revoked_key): devices refuse clinical "
                                                                     "1.0.0")
    service.set_state(srv.store, srv.signer, rid, "resume", "alice")
    svc.tick(now=t0 + 124)
    assert service.status(srv.store, rid)["state"] == "paused" and len(srv.desired()) == 1


def test_a_data_folder_without_its_root_key_sends_nothing_unjudged(revoked):
    """The check needs ``keys/root.pub`` (``fleet-server init`` pins it); without it no rollout starts, rather
    than one version going out unjudged."""
    srv = revoked
    srv.settings.root_pub.unlink()
    with pytest.raises(ConfigError, match="no root key at .*nothing is sent to devices unjudged"):
        service.start(srv.store, model="clinical", version="1.2.0", cohort={}, stages=[100], bake_seconds=0)
    assert srv.store.query("SELECT id FROM rollouts") == []
