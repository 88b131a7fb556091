"""Key folder faults found by the packager audit: an expired keyset must still be rotatable and revocable, a
swapped signing key file, a lifetime of 0 and a damaged folder are refused in one line naming the file or flag."""

from __future__ import annotations

import shutil
from datetime import timedelta

import pytest

from edgefleet_contracts.signing import key_id
from edgefleet_contracts.timeutil import utcnow
from model_packager.build import BuildRequest, build_package
from model_packager.cli import main
from model_packager.errors import KeysError
from model_packager.keys import KeyFolder, init_keys


def _one_line_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("model-packager: ")
    return err


def _expired_folder(tmp_path):
    """A key folder whose keyset v1 expired a day ago (its signing key lives on): the fleet missed a rotation."""
    return init_keys(tmp_path / "keys", keyset_lifetime=timedelta(hours=1), now=utcnow() - timedelta(days=1))


def test_an_expired_keyset_can_be_rotated(tmp_path, capsys):
    folder = _expired_folder(tmp_path)
    assert main(["keys", "rotate", "--dir", str(folder.path)]) == 0
    ks = folder.keyset()  # verified without allow_expired: the new keyset is live
    assert ks.version == 2 and ks.expires > utcnow()


def test_a_key_of_an_expired_keyset_can_be_revoked(tmp_path, capsys):
    folder = _expired_folder(tmp_path)
    leaked = next(iter(folder.keyset(allow_expired=True).keys))
    assert main(["keys", "revoke", leaked[:12], "--dir", str(folder.path)]) == 0
    ks = folder.keyset()
    assert ks.version == 2 and leaked in ks.revoked and leaked not in ks.keys and ks.expires > utcnow()


def test_building_with_an_expired_keyset_says_to_rotate(built, tmp_path, capsys):
    folder = _expired_folder(tmp_path)
    out = tmp_path / "p.efpkg"
    assert main(["build", str(built.model), "--name", "clinical", "--version", "1.0.0", "--target", "x86_64-avx2",
                 "--calibration", str(built.calibration), "--keys", str(folder.path), "--out", str(out),
                 "--quantize", "none", "--quiet"]) == 1
    err = _one_line_error(capsys)
    assert "expired" in err and f"model-packager keys rotate --dir {folder.path}" in err
    assert not out.exists()


def test_a_swapped_signing_key_file_is_refused_naming_it(built, tmp_path):
    keys = tmp_path / "keys"
    shutil.copytree(built.keys, keys)
    other = init_keys(tmp_path / "other")
    kid = (keys / "current-signing-key").read_text().strip()
    mine = KeyFolder(keys).signing_key_file(kid)
    theirs = next(other.path.glob("signing-*.key"))
    shutil.copy2(theirs, mine)  # same name, another key: every device would refuse what it signs
    with pytest.raises(KeysError, match=f"signing key {mine} holds key .* not key {kid[:16]}"):
        KeyFolder(keys).signing_key()
    out = tmp_path / "p.efpkg"
    with pytest.raises(KeysError, match="not key"):
        build_package(BuildRequest(model=built.model, name="clinical", version="1.0.0", target="x86_64-avx2",
                                   calibration=built.calibration, keys=keys, out=out, quantize="none",
                                   latency_runs=10))
    assert not out.exists()
    assert key_id(KeyFolder(other.path).signing_key()[0].public_key()) != kid


@pytest.mark.parametrize("flag", ["--key-lifetime", "--keyset-lifetime"])
def test_init_refuses_a_lifetime_of_zero(tmp_path, capsys, flag):
    assert main(["keys", "init", "--dir", str(tmp_path / "k"), flag, "0d"]) == 1
    err = _one_line_error(capsys)
    assert f"{flag} must be longer than 0" in err
    assert not (tmp_path / "k" / "root.key").exists()


def test_rotate_refuses_a_key_lifetime_of_zero(tmp_path, capsys):
    init_keys(tmp_path / "k")
    assert main(["keys", "rotate", "--dir", str(tmp_path / "k"), "--key-lifetime", "0s"]) == 1
    assert "--key-lifetime must be longer than 0" in _one_line_error(capsys)
    assert KeyFolder(tmp_path / "k").keyset().version == 1


@pytest.mark.parametrize("cmd", [["keys", "rotate"], ["keys", "revoke", "deadbeefdead"]])
def test_a_keyset_file_that_is_a_folder_is_one_clear_line(tmp_path, capsys, cmd):
    folder = init_keys(tmp_path / "k")
    folder.keyset_file.unlink()
    folder.keyset_file.mkdir()
    assert main([*cmd, "--dir", str(folder.path)]) == 1
    assert f"{folder.keyset_file} is not a file" in _one_line_error(capsys)
