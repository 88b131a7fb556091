"""Ed25519 verification of device signatures: libsodium (PyNaCl) when installed, else OpenSSL (cryptography).

Verification is the largest single cost of ingesting a summary. On this 2-core x86 host libsodium's verify
took ~62 µs against OpenSSL's ~110-130 µs (5 KB message, same key and signature, best of 15 rounds), so it
is used when PyNaCl is installed (it is in the server extra); both release the GIL. Both follow RFC 8032;
libsodium also refuses small-order public keys and non-canonical encodings, so it can only refuse more
forgeries, never accept a signature OpenSSL refuses (``tests/fleet_server/test_ingest_signatures.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives import serialization

from edgefleet_contracts.signing import Ed25519PublicKey, key_id

_sodium_open: Any
try:
    from nacl.bindings import crypto_sign_open as _sodium_open
except ImportError:  # pragma: no cover - depends on the environment
    _sodium_open = None

__all__ = ["DeviceKey"]


@dataclass(frozen=True)
class DeviceKey:
    """A device's enrolled public key, parsed once, with its key id."""

    key: Ed25519PublicKey
    keyid: str = field(init=False)
    raw: bytes = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "keyid", key_id(self.key))
        object.__setattr__(self, "raw", self.key.public_bytes(serialization.Encoding.Raw,
                                                              serialization.PublicFormat.Raw))

    def verify(self, sig: bytes, data: bytes) -> bool:
        """Whether ``sig`` is this key's Ed25519 signature of ``data`` (never raises)."""
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
