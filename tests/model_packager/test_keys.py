"""Key folder: init, rotate, revoke through the real CLI, with real keys on disk."""

from __future__ import annotations

import stat

import pytest

from edgefleet_contracts.signing import key_id
from model_packager.cli import main
from model_packager.keys import KeyFolder


def test_init_writes_private_keys_0600_and_a_root_signed_keyset(tmp_path, capsys):
    assert main(["keys", "init", "--dir", str(tmp_path / "k")]) == 0
    folder = KeyFolder(tmp_path / "k")
    for f in (tmp_path / "k").glob("*.key"):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    ks = folder.keyset()
    key, _ = folder.signing_key()
    assert ks.version == 1 and key_id(key.public_key()) in ks.keys


def test_init_refuses_to_overwrite(tmp_path, capsys):
    assert main(["keys", "init", "--dir", str(tmp_path)]) == 0
    before = (tmp_path / "root.key").read_bytes()
    assert main(["keys", "init", "--dir", str(tmp_path)]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err
    assert (tmp_path / "root.key").read_bytes() == before


def test_rotate_then_revoke_publishes_new_versions(tmp_path, capsys):
    main(["keys", "init", "--dir", str(tmp_path)])
    folder = KeyFolder(tmp_path)
    first, _ = folder.signing_key()
    assert main(["keys", "rotate", "--dir", str(tmp_path)]) == 0
    second, ks2 = folder.signing_key()
    assert ks2.version == 2 and len(ks2.keys) == 2 and key_id(second.public_key()) != key_id(first.public_key())
    assert main(["keys", "revoke", key_id(first.public_key())[:12], "--dir", str(tmp_path)]) == 0
    ks3 = folder.keyset()
    assert ks3.version == 3 and key_id(first.public_key()) in ks3.revoked and key_id(first.public_key()) not in ks3.keys
    assert (tmp_path / "keysets" / "v1.json").exists() and (tmp_path / "keysets" / "v3.json").exists()


def test_revoke_unknown_key_is_a_clear_error(tmp_path, capsys):
    main(["keys", "init", "--dir", str(tmp_path)])
    assert main(["keys", "revoke", "deadbeefdead", "--dir", str(tmp_path)]) == 1
    assert "matches 0 keys" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["rotate", "revoke"])
def test_commands_without_keys_say_how_to_start(tmp_path, capsys, cmd):
    args = ["keys", cmd, "--dir", str(tmp_path)] + (["deadbeefdead"] if cmd == "revoke" else [])
    assert main(args) == 1
    assert "root.key is missing" in capsys.readouterr().err
