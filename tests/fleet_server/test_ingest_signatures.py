"""Device signature verification: ed25519-zebra, libsodium and the OpenSSL fallback (all declared in the server
extra, in that order of preference) give the same answers for every signature a party without the device's key
can make, and ingest verifies through whichever is installed. Where zebra's ZIP 215 rules differ from
libsodium's, the difference is pinned here (see ``fleet_server/ingest/signatures.py``)."""

from __future__ import annotations

import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from nacl.bindings import (
    crypto_core_ed25519_add,
    crypto_core_ed25519_scalar_add,
    crypto_core_ed25519_scalar_mul,
    crypto_core_ed25519_scalar_reduce,
    crypto_scalarmult_ed25519_base_noclamp,
)

import fleet_server.ingest.signatures as signatures
from edgefleet_contracts.signing import Ed25519PrivateKey, Ed25519PublicKey, generate_key, key_id
from fleet_server.ingest.signatures import DeviceKey
from tests.fleet_server.conftest import Fleet

BACKENDS = ["zebra", "libsodium", "openssl"]
# A point of order 8 (on libsodium's list of small-order encodings) and the identity point.
ORDER_8 = bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a")
IDENTITY = bytes([1]) + bytes(31)


def _use(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend in ("libsodium", "openssl"):
        monkeypatch.setattr(signatures, "_zebra_verify", None)
    if backend == "openssl":
        monkeypatch.setattr(signatures, "_sodium_open", None)


def _raw(key: Ed25519PrivateKey | Ed25519PublicKey) -> bytes:
    if isinstance(key, Ed25519PrivateKey):
        return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                 serialization.NoEncryption())
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _sign_with_r_offset(key: Ed25519PrivateKey, msg: bytes, offset: bytes | None) -> bytes:
    """RFC 8032 signing done by hand, with ``offset`` (a point) added to R before k is computed: None gives the
    standard signature; a small-order point gives a signature only its key's holder can make, which satisfies
    the cofactored equation and not the cofactorless one."""
    h = hashlib.sha512(_raw(key)).digest()
    a = bytearray(h[:32])
    a[0] &= 248
    a[31] &= 127
    a[31] |= 64
    scalar = crypto_core_ed25519_scalar_reduce(bytes(a) + bytes(32))
    r = crypto_core_ed25519_scalar_reduce(hashlib.sha512(h[32:] + msg).digest())
    big_r = crypto_scalarmult_ed25519_base_noclamp(r)
    if offset is not None:
        big_r = crypto_core_ed25519_add(big_r, offset)
    k = crypto_core_ed25519_scalar_reduce(hashlib.sha512(big_r + _raw(key.public_key()) + msg).digest())
    return big_r + crypto_core_ed25519_scalar_add(r, crypto_core_ed25519_scalar_mul(k, scalar))


def test_zebra_and_libsodium_are_installed_and_zebra_verifies_enrolled_keys() -> None:
    assert signatures._zebra_verify is not None, "py-ed25519-zebra-bindings is a server dependency (pyproject)"
    assert signatures._sodium_open is not None, "pynacl is a declared server dependency (pyproject server extra)"
    assert signatures.backend(DeviceKey(generate_key().public_key())) == "zebra"


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_accepts_exactly_the_device_signature(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(backend, monkeypatch)
    device, other = generate_key(), generate_key()
    dk = DeviceKey(device.public_key())
    assert signatures.backend(dk) == backend
    data = b'{"device_id":"dev-1","seq":1}' * 100
    sig = device.sign(data)
    assert _sign_with_r_offset(device, data, None) == sig  # the hand-made signer below is RFC 8032's
    assert dk.verify(sig, data)
    assert not dk.verify(sig, data[:-1] + b"x")  # one byte changed
    assert not dk.verify(other.sign(data), data)  # another key
    assert not dk.verify(device.sign(data + b" "), data)  # a signature of another document
    for bad in (b"", sig[:63], sig + b"\0", bytes(64), sig[32:] + sig[:32], IDENTITY + bytes(32),
                ORDER_8 + bytes(32), sig[:32] + b"\xff" * 32):  # the last: s not reduced (>= l)
        assert not dk.verify(bad, data)
    assert dk.keyid == key_id(device.public_key()) and len(dk.raw) == 32


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_small_order_public_key_verifies_nothing_on_any_backend(backend: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # With a small-order key, ZIP 215's cofactored equation holds for R = identity, s = 0, on any message:
    # a signature anyone can make. Such a key is never handed to zebra.
    assert signatures._zebra_verify(IDENTITY + bytes(32), b"anything", ORDER_8) is True
    _use(backend, monkeypatch)
    dk = DeviceKey(Ed25519PublicKey.from_public_bytes(ORDER_8))
    assert not dk.valid_point and signatures.backend(dk) in ("libsodium", "openssl")
    for sig in (IDENTITY + bytes(32), ORDER_8 + bytes(32), bytes(64)):
        assert not dk.verify(sig, b"anything")


def test_a_torsion_r_from_the_key_holder_is_accepted_by_zebra_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The one documented difference: the device itself can add a small-order point to R."""
    device = generate_key()
    dk = DeviceKey(device.public_key())
    data = b'{"device_id":"dev-1","seq":2}' * 50
    odd = _sign_with_r_offset(device, data, ORDER_8)
    assert odd != device.sign(data)
    assert dk.verify(odd, data)  # zebra: cofactored equation
    assert not dk.verify(odd, data + b" ")
    monkeypatch.setattr(signatures, "_zebra_verify", None)
    assert not dk.verify(odd, data)  # libsodium: cofactorless, refuses it
    monkeypatch.setattr(signatures, "_sodium_open", None)
    assert not dk.verify(odd, data)  # OpenSSL: refuses it too


@pytest.mark.parametrize("backend", BACKENDS)
def test_ingest_stores_signed_and_refuses_forged_summaries_with_every_backend(
        fleet: Fleet, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet_server.ingest import Validator

    _use(backend, monkeypatch)
    v = Validator(fleet.settings, fleet.store)
    dev = fleet["dev-1"]
    ok = v.validate(dev.message([1, 2]), topic_device=None, source="http")
    assert [a.seq for a in ok.accepted] == [1, 2] and ok.rejected == []
    forged = v.validate(dev.message([3], signer=generate_key()), topic_device=None, source="http")
    assert forged.accepted == [] and [r.reason for r in forged.rejected] == ["bad_signature"]
