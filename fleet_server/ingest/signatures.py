"""Ed25519 verification of device signatures: ed25519-zebra, else libsodium (PyNaCl), else OpenSSL (cryptography).

Verification is the largest single cost of ingesting a summary. On this 2-core x86 host, for a 5 KB message
with the same key and signature (best of 7 rounds over 2,000 messages, /tmp script recorded in the README):

- ed25519-zebra (Rust, curve25519-dalek with its AVX2 back end chosen at run time): ~45 µs;
- libsodium's ``crypto_sign_open``: ~64 µs;
- OpenSSL: ~110-130 µs.

All three are in or behind the server extra (py-ed25519-zebra-bindings and pynacl are declared there).

What each accepts. libsodium and OpenSSL check RFC 8032's cofactorless equation ``[s]B = R + [k]A``;
libsodium also refuses small-order and non-canonical public keys and small-order R. ed25519-zebra follows ZIP
215: the cofactored equation ``[8][s]B = [8]R + [8][k]A``, with R allowed to be a non-canonical encoding.
Used naively, a small-order *public key* would make that equation hold for signatures anyone can make, so
zebra is used only for keys libsodium calls valid points (canonical, not of small order, in the prime-order
subgroup: ``crypto_core_ed25519_is_valid_point``); any other key, enrolled before this check or not, is
verified by libsodium, which refuses it. For a valid key the two differ only on signatures whose R carries a
small-order component (or is encoded non-canonically): zebra accepts those and libsodium refuses them. Making
one needs the device's private key, exactly as making an ordinary signature does, so it forges nothing; it is
a device choosing an unusual encoding of its own signature. ``tests/fleet_server/test_ingest_signatures.py``
pins all of this, that case included.

ed25519-zebra's binding holds the GIL while it verifies (libsodium's and OpenSSL's release it); ingest verifies
in validator processes, one thread each, so that costs nothing there.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization

from edgefleet_contracts.signing import Ed25519PublicKey, key_id

_sodium_open: Any
_valid_point: Any
try:
    from nacl.bindings import crypto_core_ed25519_is_valid_point as _valid_point
    from nacl.bindings import crypto_sign_open as _sodium_open
except ImportError:  # pragma: no cover - depends on the environment
    _sodium_open = _valid_point = None

_zebra_verify: Any
try:
    import ed25519_zebra

    _zebra_verify = ed25519_zebra.ed_verify
except ImportError:  # pragma: no cover - depends on the environment
    _zebra_verify = None

__all__ = ["DeviceKey", "backend"]


def backend(key: DeviceKey) -> str:
    """Which implementation verifies this key's signatures now: "zebra", "libsodium" or "openssl"."""
    if _zebra_verify is not None and key.valid_point:
        return "zebra"
    return "libsodium" if _sodium_open is not None else "openssl"


@dataclass(frozen=True)
class DeviceKey:
    """A device's enrolled public key, parsed once, with its key id."""

    key: Ed25519PublicKey
    keyid: str = field(init=False)
    raw: bytes = field(init=False)
    valid_point: bool = field(init=False)  # libsodium's check: canonical, prime order (zebra may verify it)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keyid", key_id(self.key))
        raw = self.key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "valid_point", bool(_valid_point is not None and _valid_point(raw)))

    def verify(self, sig: bytes, data: bytes) -> bool:
        """Whether ``sig`` is this key's Ed25519 signature of ``data`` (never raises)."""
        if _zebra_verify is not None and self.valid_point:
            try:
                return len(sig) == 64 and bool(_zebra_verify(bytes(sig), bytes(data), self.raw))  # no copy of bytes
            except Exception:  # a non-bytes argument; ed_verify itself answers False for anything malformed
                return False
        if _sodium_open is not None:
            if len(sig) != 64:
                return False
            try:
                _sodium_open(sig + data, self.raw)
                return True
            except Exception:  # nacl's BadSignatureError (and ValueError for malformed input)
                return False
        try:
            self.key.verify(sig, data)
            return True
        except Exception:  # cryptography's InvalidSignature (and a wrong-length signature)
            return False
