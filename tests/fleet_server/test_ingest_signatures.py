"""Device signature verification: libsodium (PyNaCl, declared in the server extra) and the OpenSSL fallback
give the same answers, and ingest verifies through whichever is installed."""

from __future__ import annotations

import pytest

import fleet_server.ingest.signatures as signatures
from edgefleet_contracts.signing import generate_key, key_id
from fleet_server.ingest.signatures import DeviceKey
from tests.fleet_server.conftest import Fleet


def test_libsodium_is_installed_and_used() -> None:
    assert signatures._sodium_open is not None, "pynacl is a declared server dependency (pyproject server extra)"


@pytest.mark.parametrize("backend", ["libsodium", "openssl"])
def test_both_backends_accept_exactly_the_device_signature(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if backend == "openssl":
        monkeypatch.setattr(signatures, "_sodium_open", None)
    device, other = generate_key(), generate_key()
    dk = DeviceKey(device.public_key())
    data = b'{"device_id":"dev-1","seq":1}' * 100
    sig = device.sign(data)
    assert dk.verify(sig, data)
    assert not dk.verify(sig, data[:-1] + b"x")  # one byte changed
    assert not dk.verify(other.sign(data), data)  # another key
    assert not dk.verify(device.sign(data + b" "), data)  # a signature of another document
    for bad in (b"", sig[:63], sig + b"\0", bytes(64), sig[32:] + sig[:32]):
        assert not dk.verify(bad, data)
    assert dk.keyid == key_id(device.public_key()) and len(dk.raw) == 32


@pytest.mark.parametrize("backend", ["libsodium", "openssl"])
def test_ingest_stores_signed_and_refuses_forged_summaries_with_either_backend(
        fleet: Fleet, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from fleet_server.ingest import Validator

    if backend == "openssl":
        monkeypatch.setattr(signatures, "_sodium_open", None)
    v = Validator(fleet.settings, fleet.store)
    dev = fleet["dev-1"]
    ok = v.validate(dev.message([1, 2]), topic_device=None, source="http")
    assert [a.seq for a in ok.accepted] == [1, 2] and ok.rejected == []
    forged = v.validate(dev.message([3], signer=generate_key()), topic_device=None, source="http")
    assert forged.accepted == [] and [r.reason for r in forged.rejected] == ["bad_signature"]
