"""Every verification rejection, each from a bad package built for real (re-signed, re-packed, tampered)."""

from __future__ import annotations

import io
import json
import tarfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from edgefleet_contracts import (
    ExpiredError,
    FileMismatchError,
    RevokedKeyError,
    SchemaError,
    TamperedError,
    TargetMismatchError,
    UnsafeArchiveError,
    UnsignedError,
    UntrustedKeyError,
    open_package,
)
from edgefleet_contracts.keyset import DelegatedKey, Keyset
from edgefleet_contracts.signing import generate_key, key_id, load_private_key, load_public_key, sign_envelope
from edgefleet_contracts.timeutil import fmt, utcnow
from model_packager.cli import main
from model_packager.keys import KeyFolder, revoke_key, rotate_keys


def _members(pkg: Path) -> list[tuple[tarfile.TarInfo, bytes]]:
    with tarfile.open(pkg, "r:") as tar:
        return [(m, tar.extractfile(m).read() if m.isreg() else b"") for m in tar]  # type: ignore[union-attr]


def _doc(members: list[tuple[tarfile.TarInfo, bytes]], name: str) -> dict[str, Any]:
    return json.loads(next(d for m, d in members if m.name == name))


def _write(out: Path, members: list[tuple[tarfile.TarInfo, bytes]]) -> Path:
    with tarfile.open(out, "w:", format=tarfile.PAX_FORMAT) as tar:
        for m, data in members:
            ti = tarfile.TarInfo(m.name)
            ti.size, ti.type, ti.linkname = len(data), m.type, m.linkname
            tar.addfile(ti, io.BytesIO(data) if m.isreg() else None)
    return out


def _replace(members: list, name: str, doc: dict) -> list:
    data = json.dumps(doc).encode()
    return [(m, data if m.name == name else d) for m, d in members]


def _resign(built, tmp_path: Path, signer, mutate=lambda s: None, keyset_env=None) -> Path:
    members = _members(built.package)
    env = _doc(members, "manifest.json")
    mutate(env["signed"])
    members = _replace(members, "manifest.json", sign_envelope(env["signed"], signer) if signer else
                       {"signed": env["signed"], "signatures": []})
    if keyset_env is not None:
        members = _replace(members, "keyset.json", keyset_env)
    return _write(tmp_path / "bad.efpkg", members)


def _verify(pkg: Path, built, **kw: Any):
    return open_package(pkg, load_public_key(built.keys / "root.pub"), now=kw.pop("now", utcnow()), **kw)


def _signer(built):
    return KeyFolder(built.keys).signing_key()[0]


def test_good_package_verifies_and_extracts_every_listed_file(built, tmp_path):
    vp = _verify(built.package, built, target="x86_64-avx2", staging=tmp_path / "s")
    assert vp.manifest.name == "clinical" and vp.manifest.owner == "clinical-ml"
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(vp.manifest.files)


def test_cli_verify_prints_a_one_line_verdict(built, capsys):
    assert main(["verify", str(built.package), "--root", str(built.keys / "root.pub")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("OK: clinical 1.0.0 for x86_64-avx2")


def test_unsigned_manifest(built, tmp_path, capsys):
    bad = _resign(built, tmp_path, None)
    with pytest.raises(UnsignedError, match="manifest is unsigned"):
        _verify(bad, built)
    assert main(["verify", str(bad), "--root", str(built.keys / "root.pub")]) == 1
    assert "REJECTED (unsigned)" in capsys.readouterr().err


def test_manifest_signed_by_untrusted_key(built, tmp_path):
    with pytest.raises(UntrustedKeyError, match="not trusted; trusted keys"):
        _verify(_resign(built, tmp_path, generate_key()), built)


def test_keyset_swapped_for_one_not_signed_by_root(built, tmp_path):
    rogue = generate_key()
    now = utcnow()
    ks = Keyset(9, now, now + timedelta(days=9), {key_id(rogue.public_key()): DelegatedKey(
        key_id(rogue.public_key()), rogue.public_key(), now + timedelta(days=9))})
    bad = _resign(built, tmp_path, rogue, keyset_env=sign_envelope(ks.to_signed(), rogue))
    with pytest.raises(UntrustedKeyError, match="keyset is not signed by the trusted root"):
        _verify(bad, built)


def test_manifest_altered_after_signing(built, tmp_path):
    members = _members(built.package)
    env = _doc(members, "manifest.json")
    env["signed"]["version"] = "9.9.9"
    with pytest.raises(TamperedError, match="does not verify"):
        _verify(_write(tmp_path / "bad.efpkg", _replace(members, "manifest.json", env)), built)


def test_signed_by_revoked_key(built, tmp_path):
    import shutil

    keys = tmp_path / "keys"
    shutil.copytree(built.keys, keys)
    old = KeyFolder(keys).signing_key()[0]
    rotate_keys(keys)
    ks = revoke_key(keys, key_id(old.public_key())[:12])
    # The package still carries keyset v1; a verifier holding v3 must refuse the revoked signer.
    with pytest.raises(RevokedKeyError, match=f"keyset version {ks.version} revokes"):
        _verify(built.package, built, trusted_keyset=KeyFolder(keys).keyset())
    assert main(["verify", str(built.package), "--root", str(keys / "root.pub"),
                 "--keyset", str(keys / "keyset.json")]) == 1


def test_signed_by_expired_key(built, tmp_path):
    root = load_private_key(built.keys / "root.key")
    signer = generate_key()
    now = utcnow()
    kid = key_id(signer.public_key())
    ks = Keyset(50, now - timedelta(days=10), now + timedelta(days=10),
                {kid: DelegatedKey(kid, signer.public_key(), now - timedelta(days=1))})
    bad = _resign(built, tmp_path, signer, keyset_env=sign_envelope(ks.to_signed(), root))
    with pytest.raises(ExpiredError, match=f"signed by key {kid[:12]}.*which expired"):
        _verify(bad, built)


def test_expired_package(built, tmp_path):
    bad = _resign(built, tmp_path, _signer(built), lambda s: s.update(expires=fmt(utcnow() - timedelta(hours=1))))
    with pytest.raises(ExpiredError, match="package clinical 1.0.0 expired"):
        _verify(bad, built)


def test_expired_by_the_verifiers_clock(built):
    with pytest.raises(ExpiredError):
        _verify(built.package, built, now=utcnow() + timedelta(days=4000))


def test_wrong_target(built):
    with pytest.raises(TargetMismatchError, match="built for target 'x86_64-avx2', not 'rpi5-aarch64'"):
        _verify(built.package, built, target="rpi5-aarch64")


def test_one_byte_of_weights_flipped(built, tmp_path):
    members = _members(built.package)
    out = []
    for m, d in members:
        if m.name == "model.onnx":
            d = d[:100] + bytes([d[100] ^ 1]) + d[101:]
        out.append((m, d))
    with pytest.raises(FileMismatchError, match="file 'model.onnx' has sha256 .* but the manifest says"):
        _verify(_write(tmp_path / "bad.efpkg", out), built)


def test_file_length_differs_from_manifest(built, tmp_path):
    members = [(m, d + b"\0" * 10 if m.name == "profile.json" else d) for m, d in _members(built.package)]
    with pytest.raises(FileMismatchError, match="'profile.json' is .* bytes in the archive but the manifest says"):
        _verify(_write(tmp_path / "bad.efpkg", members), built)


def test_extra_file(built, tmp_path):
    members = _members(built.package) + [(tarfile.TarInfo("payload.sh"), b"#!/bin/sh\nrm -rf /\n")]
    with pytest.raises(FileMismatchError, match="holds file 'payload.sh', which the signed manifest does not list"):
        _verify(_write(tmp_path / "bad.efpkg", members), built)


def test_missing_file(built, tmp_path):
    members = [(m, d) for m, d in _members(built.package) if m.name != "golden.npz"]
    with pytest.raises(FileMismatchError, match="missing files listed in the manifest: golden.npz"):
        _verify(_write(tmp_path / "bad.efpkg", members), built)


@pytest.mark.parametrize(
    ("name", "kind", "message"),
    [
        ("../../etc/evil", tarfile.REGTYPE, "escapes the package folder"),
        ("/etc/evil", tarfile.REGTYPE, "absolute path"),
        ("model-link", tarfile.SYMTYPE, "is a link"),
        ("hard-link", tarfile.LNKTYPE, "is a link"),
        ("fifo", tarfile.FIFOTYPE, "not a regular file"),
    ],
)
def test_unsafe_archive_members(built, tmp_path, name, kind, message):
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.linkname = "/etc/passwd" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
    members = _members(built.package)
    members.insert(2, (ti, b"x" if kind == tarfile.REGTYPE else b""))
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(UnsafeArchiveError, match=message):
        _verify(_write(tmp_path / "bad.efpkg", members), built, staging=staging)
    assert not (tmp_path / "etc").exists() and list(staging.iterdir()) == []


def test_duplicate_member(built, tmp_path):
    members = _members(built.package)
    members.append(next((m, d) for m, d in members if m.name == "model.onnx"))
    with pytest.raises(UnsafeArchiveError, match="appears twice"):
        _verify(_write(tmp_path / "bad.efpkg", members), built)


def test_endless_data_past_declared_length_is_never_read(built, tmp_path):
    """A member claiming 2 GiB: refused from the header, before a byte of it is read."""
    members = _members(built.package)
    with tarfile.open(tmp_path / "bad.efpkg", "w:", format=tarfile.PAX_FORMAT) as tar:
        for m, d in members:
            ti = tarfile.TarInfo(m.name)
            ti.size = len(d)
            tar.addfile(ti, io.BytesIO(d))
    raw = bytearray((tmp_path / "bad.efpkg").read_bytes())
    # Rewrite the size field of the model member's header to 2 GiB (octal, 11 digits + NUL).
    idx = raw.find(b"model.onnx\0")
    raw[idx + 124 : idx + 136] = b"%011o\0" % (2 << 30)
    chk = sum(raw[idx : idx + 148]) + 8 * 32 + sum(raw[idx + 156 : idx + 512])
    raw[idx + 148 : idx + 156] = b"%06o\0 " % chk
    (tmp_path / "bad.efpkg").write_bytes(raw)
    with pytest.raises(FileMismatchError, match="'model.onnx' is 2147483648 bytes in the archive"):
        _verify(tmp_path / "bad.efpkg", built)


def test_manifest_must_come_first(built, tmp_path):
    members = _members(built.package)
    members = [members[1], members[0]] + members[2:]
    with pytest.raises(FileMismatchError, match="must start with keyset.json then manifest.json"):
        _verify(_write(tmp_path / "bad.efpkg", members), built)


def test_not_an_archive(built, tmp_path):
    (tmp_path / "junk.efpkg").write_bytes(b"\x89PNG not a tar at all" * 50)
    from edgefleet_contracts import PackageError

    with pytest.raises(PackageError, match="not a readable"):
        _verify(tmp_path / "junk.efpkg", built)


def test_manifest_with_unsafe_file_path_is_a_schema_error(built, tmp_path):
    def mutate(s):
        s["files"]["../escape"] = s["files"].pop("report.json")

    with pytest.raises(SchemaError, match="unsafe or reserved path"):
        _verify(_resign(built, tmp_path, _signer(built), mutate), built)
