"""The trust rules over real Ed25519 keys: who may sign a keyset, who may sign a manifest, and when."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from edgefleet_contracts import (
    ExpiredError,
    Keyset,
    RevokedKeyError,
    RollbackError,
    SchemaError,
    TamperedError,
    TargetMismatchError,
    UnsignedError,
    UntrustedKeyError,
    check_target,
    verify_keyset,
    verify_manifest,
)
from edgefleet_contracts.keyset import DelegatedKey
from edgefleet_contracts.signing import generate_key, key_id, sign_envelope
from edgefleet_contracts.timeutil import fmt

NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC)


def _keyset(version: int = 1, keys: list | None = None, revoked: frozenset[str] = frozenset(),
            expires: datetime = NOW + timedelta(days=30)) -> Keyset:
    ks = {}
    for k, exp in keys or []:
        ks[key_id(k.public_key())] = DelegatedKey(key_id(k.public_key()), k.public_key(), exp)
    return Keyset(version, NOW - timedelta(days=1), expires, ks, revoked)


def _manifest(**over: object) -> dict:
    m = {
        "type": "edgefleet.package", "spec": 1, "name": "clinical", "version": "1.0.0", "target": "x86_64-avx2",
        "runtime": "onnxruntime", "kind": "tabular", "model_file": "model.onnx",
        "input": {"name": "input", "dtype": "float32", "shape": [-1, 2],
                  "features": [{"name": "a", "min": 0, "max": 1}, {"name": "b", "min": 0, "max": 1}]},
        "output": {"probabilities": "probabilities", "classes": ["no", "yes"]},
        "files": {"model.onnx": {"sha256": "0" * 64, "length": 3}},
        "created": fmt(NOW - timedelta(days=1)), "expires": fmt(NOW + timedelta(days=10)),
    }
    m.update(over)
    return m


@pytest.fixture()
def root():
    return generate_key()


@pytest.fixture()
def signer():
    return generate_key()


def test_keyset_signed_by_root_is_accepted(root, signer):
    env = sign_envelope(_keyset(keys=[(signer, NOW + timedelta(days=5))]).to_signed(), root)
    ks = verify_keyset(env, root.public_key(), NOW)
    assert key_id(signer.public_key()) in ks.keys


def test_keyset_signed_only_by_another_key_is_not_trusted(root, signer):
    env = sign_envelope(_keyset(keys=[(signer, NOW + timedelta(days=5))]).to_signed(), signer)
    with pytest.raises(UntrustedKeyError, match="not signed by the trusted root key"):
        verify_keyset(env, root.public_key(), NOW)


def test_unsigned_keyset_is_rejected(root):
    env = {"signed": _keyset().to_signed(), "signatures": []}
    with pytest.raises(UnsignedError, match="unsigned"):
        verify_keyset(env, root.public_key(), NOW)


def test_altered_keyset_fails_signature(root, signer):
    env = sign_envelope(_keyset(keys=[(signer, NOW + timedelta(days=5))]).to_signed(), root)
    env["signed"]["version"] = 7
    with pytest.raises(TamperedError, match="does not verify"):
        verify_keyset(env, root.public_key(), NOW)


def test_older_keyset_than_trusted_is_a_rollback(root):
    env = sign_envelope(_keyset(version=2).to_signed(), root)
    with pytest.raises(RollbackError, match="version 2 is older than version 3"):
        verify_keyset(env, root.public_key(), NOW, min_version=3)


def test_expired_keyset_is_rejected(root):
    env = sign_envelope(_keyset(expires=NOW - timedelta(seconds=1)).to_signed(), root)
    with pytest.raises(ExpiredError, match="keyset version 1 expired"):
        verify_keyset(env, root.public_key(), NOW)


def test_manifest_by_delegated_key_is_accepted(signer):
    ks = _keyset(keys=[(signer, NOW + timedelta(days=5))])
    m, kid = verify_manifest(sign_envelope(_manifest(), signer), ks, NOW)
    assert (m.name, m.version, kid) == ("clinical", "1.0.0", key_id(signer.public_key()))


def test_manifest_by_revoked_key_names_the_revocation(signer):
    kid = key_id(signer.public_key())
    ks = _keyset(version=2, revoked=frozenset({kid}))
    with pytest.raises(RevokedKeyError, match="keyset version 2 revokes"):
        verify_manifest(sign_envelope(_manifest(), signer), ks, NOW)


def test_manifest_by_unknown_key_lists_trusted_keys(signer):
    ks = _keyset(keys=[(signer, NOW + timedelta(days=5))])
    with pytest.raises(UntrustedKeyError, match="not trusted; trusted keys: " + key_id(signer.public_key())[:12]):
        verify_manifest(sign_envelope(_manifest(), generate_key()), ks, NOW)


def test_manifest_by_expired_signing_key_is_rejected(signer):
    ks = _keyset(keys=[(signer, NOW - timedelta(seconds=1))])
    with pytest.raises(ExpiredError, match="expired at .*keys rotate"):
        verify_manifest(sign_envelope(_manifest(), signer), ks, NOW)


def test_expired_package_is_rejected(signer):
    ks = _keyset(keys=[(signer, NOW + timedelta(days=5))])
    env = sign_envelope(_manifest(expires=fmt(NOW - timedelta(hours=1))), signer)
    with pytest.raises(ExpiredError, match="package clinical 1.0.0 expired"):
        verify_manifest(env, ks, NOW)


def test_manifest_with_bad_schema_names_the_field(signer):
    ks = _keyset(keys=[(signer, NOW + timedelta(days=5))])
    env = sign_envelope(_manifest(runtime="tensorrt"), signer)
    with pytest.raises(SchemaError, match="manifest.runtime 'tensorrt'"):
        verify_manifest(env, ks, NOW)


def test_wrong_target_is_rejected(signer):
    ks = _keyset(keys=[(signer, NOW + timedelta(days=5))])
    m, _ = verify_manifest(sign_envelope(_manifest(), signer), ks, NOW)
    check_target(m, "x86_64-avx2")
    with pytest.raises(TargetMismatchError, match="built for target 'x86_64-avx2', not 'rpi4-aarch64'"):
        check_target(m, "rpi4-aarch64")
