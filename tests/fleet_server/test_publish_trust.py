"""Publishing judges a package as a device would (the newest keyset the server holds decides), and publishing
again keeps the model settings it is not given."""

from __future__ import annotations

import io
import json
import shutil
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from edgefleet_contracts.errors import FileMismatchError, RevokedKeyError
from edgefleet_contracts.keyset import Keyset
from edgefleet_contracts.signing import generate_key, key_id, sign_envelope
from edgefleet_contracts.timeutil import utcnow
from fleet_server.cli import main as fleet_cli
from fleet_server.errors import ConfigError, RequestError
from fleet_server.registry import publish, show
from fleet_server.settings import ServerSettings
from fleet_server.store import Store
from model_packager.build import BuildRequest, build_package
from model_packager.keys import KeyFolder, revoke_key, rotate_keys

OWNER = {"owner": "clinical-ml", "oncall": "http://127.0.0.1:9/page"}


@dataclass(frozen=True)
class Revoked:
    """Signing key K1 (which signed the session's clinical 1.0.0, keyset v1) revoked after a rotation to K2."""

    keys: Path
    revoked: str  # K1's key id
    v2_package: Path  # clinical 1.1.0, signed by K2, carries keyset v2 (K1 still live in it)
    v3_package: Path  # clinical 1.2.0, signed by K2, carries keyset v3 (K1 revoked)


def _build(built, keys: Path, version: str, out: Path) -> Path:
    build_package(BuildRequest(model=built.model, name="clinical", version=version, target="x86_64-avx2",
                               calibration=built.calibration, holdout=built.holdout, keys=keys, out=out,
                               quantize="none", owner="clinical-ml", latency_runs=10))
    return out


@pytest.fixture(scope="module")
def revoked(built, tmp_path_factory) -> Revoked:
    root = tmp_path_factory.mktemp("revoked")
    keys = root / "keys"
    shutil.copytree(built.keys, keys)
    k1 = key_id(KeyFolder(keys).signing_key()[0].public_key())
    rotate_keys(keys)
    v2 = _build(built, keys, "1.1.0", root / "clinical-1.1.0.efpkg")
    assert revoke_key(keys, k1[:12]).version == 3
    v3 = _build(built, keys, "1.2.0", root / "clinical-1.2.0.efpkg")
    return Revoked(keys, k1, v2, v3)


@pytest.fixture()
def server(built, tmp_path) -> tuple[ServerSettings, Store]:
    data = tmp_path / "server"
    assert fleet_cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub")]) == 0
    settings = ServerSettings(data_dir=data)
    store = Store(settings.db_path)
    yield settings, store
    store.close()


def _publish(settings: ServerSettings, store: Store, pkg: Path, **kw):
    return publish(store, settings.packages_dir, settings.root_pub, pkg, **kw)


def _published(settings: ServerSettings, store: Store) -> tuple[list[str], list[str], list[str]]:
    """(version rows, files in packages/, anything else left in the data folder besides what init and a
    publish make)."""
    rows = [r["version"] for r in store.query("SELECT version FROM model_versions ORDER BY version")]
    files = sorted(p.name for p in settings.packages_dir.iterdir()) if settings.packages_dir.exists() else []
    known = {"server.toml", "keys", "packages", "fleet.sqlite", "fleet.sqlite-wal", "fleet.sqlite-shm"}
    stray = sorted(p.name for p in settings.data_dir.iterdir() if p.name not in known)
    return rows, files, stray


def _kept(settings: ServerSettings) -> Path:
    """Where the server keeps the newest keyset it has verified (README: Security model)."""
    return settings.data_dir / "keys" / "keyset.json"


def _held_version(settings: ServerSettings) -> int:
    return int(json.loads(_kept(settings).read_text())["signed"]["version"])


# ---- trust -------------------------------------------------------------------------------------------------
def test_a_package_signed_by_a_key_that_a_published_keyset_revokes_is_refused_and_nothing_is_stored(
        server, built, revoked, capsys):
    settings, store = server
    _publish(settings, store, revoked.v3_package, **OWNER)
    # The session's 1.0.0 is signed by K1 and carries keyset v1, where K1 is still live: a device that has
    # installed 1.2.0 holds v3 and refuses it, so the server must too.
    with pytest.raises(RevokedKeyError, match=f"key {revoked.revoked[:12]}.*keyset version 3 revokes"):
        _publish(settings, store, built.package, **OWNER)
    assert _published(settings, store) == (["1.2.0"], ["clinical-1.2.0.efpkg"], [])
    kept = _kept(settings)
    assert _held_version(settings) == 3 and stat.S_IMODE(kept.stat().st_mode) == 0o644
    capsys.readouterr()
    assert fleet_cli(["models", "publish", str(built.package), "--data", str(settings.data_dir), "--owner",
                      "clinical-ml", "--oncall", "http://127.0.0.1:9/page"]) == 1
    assert "REJECTED (revoked_key)" in capsys.readouterr().err
    assert _published(settings, store) == (["1.2.0"], ["clinical-1.2.0.efpkg"], [])


def test_a_package_carrying_an_older_keyset_is_judged_by_the_newest_and_the_keyset_never_moves_back(
        server, revoked):
    settings, store = server
    _publish(settings, store, revoked.v3_package, **OWNER)
    doc = _publish(settings, store, revoked.v2_package)  # K2 is live in v3 too
    assert doc["keyset_version"] == 3 and _held_version(settings) == 3
    assert _published(settings, store)[0] == ["1.1.0", "1.2.0"]


def test_publishing_the_newer_keyset_first_in_the_other_order_also_ends_at_the_newest(server, revoked):
    settings, store = server
    _publish(settings, store, revoked.v2_package, **OWNER)
    assert _held_version(settings) == 2
    _publish(settings, store, revoked.v3_package)
    assert _held_version(settings) == 3


def test_a_data_folder_published_before_the_server_kept_a_keyset_starts_from_its_packages(server, built, revoked):
    settings, store = server
    _publish(settings, store, revoked.v3_package, **OWNER)
    _kept(settings).unlink()  # as a data folder published to by an older server
    with pytest.raises(RevokedKeyError):
        _publish(settings, store, built.package)
    assert not _kept(settings).exists()  # a refused publish writes nothing, not even that
    _publish(settings, store, revoked.v2_package)
    assert _held_version(settings) == 3


def test_a_refused_package_teaches_the_server_no_keyset(server, built, revoked, tmp_path):
    settings, store = server
    with tarfile.open(revoked.v3_package, "r:") as tar:  # v3 keyset and a valid manifest, one payload byte off
        members = [(m, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]
    bad = tmp_path / "bad.efpkg"
    with tarfile.open(bad, "w:", format=tarfile.PAX_FORMAT) as out:
        for m, data in members:
            if m.name == "profile.json":
                data = data[:-1] + bytes([data[-1] ^ 1])
            out.addfile(m, io.BytesIO(data))
    with pytest.raises(FileMismatchError):
        _publish(settings, store, bad, **OWNER)
    assert _published(settings, store) == ([], [], []) and not _kept(settings).exists()
    _publish(settings, store, built.package, **OWNER)  # K1 is live in every keyset this server has verified
    assert _held_version(settings) == 1


def test_a_kept_keyset_that_does_not_verify_against_the_root_stops_publishing(server, built):
    settings, store = server
    rogue = generate_key()
    now = utcnow()
    forged = sign_envelope(Keyset(99, now, now.replace(year=now.year + 1)).to_signed(), rogue)
    _kept(settings).write_text(json.dumps(forged))
    with pytest.raises(ConfigError, match="keyset.json does not verify against the fleet's root key"):
        _publish(settings, store, built.package, **OWNER)
    assert _published(settings, store) == ([], [], [])


# ---- model settings ----------------------------------------------------------------------------------------
def test_publishing_again_keeps_the_settings_it_is_not_given(server, built, revoked):
    settings, store = server
    _publish(settings, store, built.package, retrain_every="30d", retrain_hook="retrain.sh", retrain_on_drift=True,
             **OWNER)
    _publish(settings, store, built.package, **OWNER)  # the same version again, owner and on-call restated
    shown = show(store, "clinical")
    assert shown["retrain_on_drift"] is True and shown["retrain_hook"] == "retrain.sh"
    assert shown["retrain_every_s"] == 30 * 86400
    doc = _publish(settings, store, revoked.v2_package)  # a new version, nothing restated
    assert (doc["owner"], doc["oncall"], doc["retrain_on_drift"]) == ("clinical-ml", OWNER["oncall"], True)
    shown = show(store, "clinical")
    assert (shown["owner"], shown["oncall"], shown["retrain_hook"], shown["retrain_on_drift"]) == (
        "clinical-ml", OWNER["oncall"], "retrain.sh", True)


def test_settings_given_again_replace_the_stored_ones(server, built, revoked):
    settings, store = server
    _publish(settings, store, built.package, retrain_every="30d", retrain_hook="retrain.sh", retrain_on_drift=True,
             **OWNER)
    _publish(settings, store, revoked.v2_package, owner="vision-ml", oncall="https://pager.example/v",
             retrain_on_drift=False, retrain_hook="", retrain_every="")
    shown = show(store, "clinical")
    assert (shown["owner"], shown["oncall"]) == ("vision-ml", "https://pager.example/v")
    assert shown["retrain_on_drift"] is False and shown["retrain_hook"] is None and shown["retrain_every_s"] is None


def test_a_models_first_publish_needs_an_owner_and_an_oncall_route(server, built):
    settings, store = server
    with pytest.raises(RequestError, match="published for the first time: it needs an owner"):
        _publish(settings, store, built.package, owner="clinical-ml")
    assert _published(settings, store) == ([], [], [])
    assert store.query("SELECT * FROM models") == [] and not _kept(settings).exists()
    with pytest.raises(RequestError, match="--retrain-every"):
        _publish(settings, store, built.package, retrain_every="monthly", **OWNER)


def test_the_cli_republish_keeps_what_it_is_not_told_and_show_says_it(cli_data: Path, built,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    d = str(cli_data)
    assert fleet_cli(["models", "publish", str(built.package), "--data", d, "--retrain-hook", "true",
                      "--retrain-on-drift"]) == 0  # owner and on-call kept from the first publish
    assert fleet_cli(["models", "publish", str(built.package), "--data", d, "--oncall", "http://127.0.0.1:9/y"]) == 0
    capsys.readouterr()
    assert fleet_cli(["models", "show", "clinical", "--data", d]) == 0
    out = capsys.readouterr().out
    assert "owner: ml   paged at: http://127.0.0.1:9/y" in out
    assert "retrain hook: true   retrain on drift: yes" in out
    assert fleet_cli(["models", "publish", str(built.package), "--data", d, "--no-retrain-on-drift"]) == 0
    capsys.readouterr()
    assert fleet_cli(["models", "show", "clinical", "--data", d]) == 0
    assert "retrain on drift: no" in capsys.readouterr().out


def test_publishing_a_missing_folder_or_junk_file_names_the_operators_file(cli_data: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """Raw errno text, and for junk the path of the server's own temporary copy, were shown before (found by a
    README walkthrough audit)."""
    d = str(cli_data)
    junk = tmp_path / "junk.efpkg"
    junk.write_bytes(b"not a tar file at all" * 50)
    for pkg, says in ((tmp_path / "nope.efpkg", f"package {tmp_path / 'nope.efpkg'} does not exist"),
                      (tmp_path, f"{tmp_path} is a folder, not a package file"),
                      (junk, f"{junk} is not a readable package archive")):
        assert fleet_cli(["models", "publish", str(pkg), "--data", d, "--owner", "ml",
                          "--oncall", "http://127.0.0.1:9/x"]) == 1
        err = capsys.readouterr().err
        assert says in err and "tmp" not in err.replace(str(tmp_path), ""), err
        assert "Errno" not in err, err
