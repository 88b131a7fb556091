"""A private key file that its group or others may access is refused when loaded, by every part that loads one
(device key, fleet signing key, packager root and signing keys), with a message naming the file and the fix,
as OpenSSH refuses one. Real key files written by the project's own code, then chmod'ed as a person might."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from edgefleet_contracts.errors import ContractError, SchemaError
from edgefleet_contracts.signing import (
    InsecureKeyFileError,
    generate_key,
    key_id,
    load_private_key,
    save_private_key,
    save_public_key,
)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "some.key"
    save_private_key(generate_key(), path)
    return path


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o666, 0o610, 0o601, 0o740], ids=oct)
def test_a_private_key_accessible_by_group_or_others_is_refused_naming_the_file_and_the_fix(key_file: Path,
                                                                                           mode: int) -> None:
    key_file.chmod(mode)
    with pytest.raises(InsecureKeyFileError) as info:
        load_private_key(key_file)
    msg = str(info.value)
    assert str(key_file) in msg and "accessible by group or others" in msg
    assert stat.filemode(stat.S_IFREG | mode) in msg and f"run `chmod 600 {key_file}`" in msg
    assert info.value.reason == "insecure_key_file"
    assert isinstance(info.value, SchemaError)  # callers that handled an unusable key file still do
    assert isinstance(info.value, ContractError)  # which every command line reports as a one-line error


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o700], ids=oct)
def test_a_private_key_only_its_owner_may_access_loads(key_file: Path, mode: int) -> None:
    key_file.chmod(mode)
    assert key_id(load_private_key(key_file).public_key())


def test_every_private_key_the_project_writes_is_0600_and_loads(key_file: Path) -> None:
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    load_private_key(key_file)


def test_the_mode_checked_is_the_mode_of_the_file_read_through_a_symlink(key_file: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.key"
    link.symlink_to(key_file)  # a symlink's own mode is 0777 and says nothing: the target's counts
    load_private_key(link)
    key_file.chmod(0o644)
    with pytest.raises(InsecureKeyFileError):
        load_private_key(link)


# ---- each part that loads a private key ---------------------------------------------------------------
def test_the_device_agent_refuses_a_world_readable_device_key(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from device_agent.agent import Agent
    from device_agent.cli import main as agent_cli
    from model_packager.keys import init_keys

    keys = init_keys(tmp_path / "keys")
    fleet = tmp_path / "fleet.key"
    save_private_key(generate_key(), fleet)
    save_public_key(load_private_key(fleet).public_key(), tmp_path / "fleet.pub")
    dev = tmp_path / "dev"
    assert agent_cli(["provision", "--dir", str(dev), "--device-id", "dev-1", "--target", "x86_64-avx2",
                      "--root-key", str(keys.root_pub), "--fleet-key", str(tmp_path / "fleet.pub")]) == 0
    device_key = dev / "keys" / "device.key"
    device_key.chmod(0o644)  # e.g. copied onto the SD card with a tool that does not keep modes

    with pytest.raises(InsecureKeyFileError, match="chmod 600"):
        Agent.open(dev, background=False)
    (tmp_path / "in.json").write_text("[1.0]")
    capsys.readouterr()
    assert agent_cli(["predict", "--dir", str(dev), str(tmp_path / "in.json")]) == 1
    err = capsys.readouterr().err
    assert f"error (insecure_key_file): private key {device_key} is accessible by group or others" in err
    assert f"run `chmod 600 {device_key}`" in err

    device_key.chmod(0o600)
    Agent.open(dev, background=False).close()


def test_the_fleet_server_refuses_a_world_readable_fleet_signing_key(tmp_path: Path) -> None:
    from fleet_server.rollouts.service import DesiredSigner
    from fleet_server.settings import ServerSettings

    settings = ServerSettings(data_dir=tmp_path / "srv")
    settings.fleet_key.parent.mkdir(parents=True)
    save_private_key(generate_key(), settings.fleet_key)
    settings.fleet_key.chmod(0o644)
    with pytest.raises(InsecureKeyFileError, match=f"private key {settings.fleet_key} is accessible"):
        DesiredSigner.from_settings(settings)
    settings.fleet_key.chmod(0o600)
    DesiredSigner.from_settings(settings)


def test_the_packager_refuses_a_world_readable_signing_or_root_key(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from model_packager.cli import main as packager_cli
    from model_packager.keys import KeyFolder, init_keys

    folder = init_keys(tmp_path / "keys")
    copy = tmp_path / "copied"
    shutil.copytree(folder.path, copy)  # copy2 keeps each key's 0600: still usable
    KeyFolder(copy).signing_key()

    signing = next(copy.glob("signing-*.key"))
    signing.chmod(0o644)
    with pytest.raises(InsecureKeyFileError, match=f"private key {signing} is accessible"):
        KeyFolder(copy).signing_key()

    signing.chmod(0o600)
    (copy / "root.key").chmod(0o640)
    before = (copy / "keyset.json").read_bytes()
    capsys.readouterr()
    assert packager_cli(["keys", "rotate", "--dir", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "REJECTED (insecure_key_file)" in err and f"run `chmod 600 {copy / 'root.key'}`" in err
    assert (copy / "keyset.json").read_bytes() == before  # nothing was published with the exposed root key
