"""Ed25519 keys, key ids and signed envelopes (the TUF shape: ``{"signed": {...}, "signatures": [...]}``).

Key id = hex sha256 of the raw 32-byte public key. Public keys travel as base64 of those raw bytes; on disk
they are PEM files. Private keys are written 0600 and never overwritten, and a private key file that grants any
permission to its group or to others is refused when loaded (``InsecureKeyFileError``), as OpenSSH refuses one:
such a key may already have been read by another account, and using it quietly would hide that.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .atomic import atomic_write_bytes
from .canonical import canonical_bytes
from .errors import SchemaError, TamperedError, UnsignedError, UntrustedKeyError

__all__ = [
    "PRIVATE_KEY_MODE_MASK",
    "Ed25519PrivateKey",
    "InsecureKeyFileError",
    "Ed25519PublicKey",
    "generate_key",
    "key_id",
    "public_b64",
    "public_from_b64",
    "load_private_key",
    "load_public_key",
    "save_private_key",
    "save_public_key",
    "sign_envelope",
    "envelope_json",
    "envelope_signatures",
    "verify_envelope",
    "short",
]


# Permission bits a private key file must not have: any access by its group or by others.
PRIVATE_KEY_MODE_MASK = 0o077


class InsecureKeyFileError(SchemaError):
    """A private key file is accessible by its group or by others (its mode has a bit of 0o077 set).

    A SchemaError (callers that caught SchemaError for an unusable key file still do) with its own reason token.
    """

    reason = "insecure_key_file"


def generate_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(_raw_public(key)).hexdigest()


def short(keyid: str) -> str:
    return keyid[:12] + "…"


def public_b64(key: Ed25519PublicKey) -> str:
    return base64.b64encode(_raw_public(key)).decode()


def public_from_b64(text: str) -> Ed25519PublicKey:
    """Raises SchemaError when ``text`` is not base64 of a 32-byte Ed25519 public key."""
    try:
        raw = base64.b64decode(text, validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise SchemaError(f"not a base64 Ed25519 public key: {exc}") from exc


def save_private_key(key: Ed25519PrivateKey, path: Path, *, overwrite: bool = False) -> None:
    """Write a PEM private key with mode 0600. Refuses to overwrite unless told (FileExistsError)."""
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; refusing to overwrite a private key")
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    atomic_write_bytes(path, pem, mode=0o600)


def save_public_key(key: Ed25519PublicKey, path: Path) -> None:
    pem = key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    atomic_write_bytes(path, pem, mode=0o644)


def _read_private(path: Path) -> bytes:
    """The bytes of a private key file whose mode grants its group and others nothing.

    The mode is taken from the open file (``fstat``), so the file checked is the file read. Raises
    InsecureKeyFileError for a group- or world-accessible file, OSError when it cannot be opened or read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as fh:
        mode = os.fstat(fh.fileno()).st_mode
        if mode & PRIVATE_KEY_MODE_MASK:
            raise InsecureKeyFileError(
                f"private key {path} is accessible by group or others (mode {stat.filemode(mode)}, "
                f"{stat.S_IMODE(mode):04o}); refusing to use it: run `chmod 600 {path}` (and, if another account "
                "may have read it, replace the key)")
        return fh.read()


def load_private_key(path: Path) -> Ed25519PrivateKey:
    """Load an unencrypted Ed25519 PEM private key from a file only its owner may access (like OpenSSH).

    Raises InsecureKeyFileError (a SchemaError) when the file's mode grants any permission to its group or to
    others (``chmod 600`` fixes it), SchemaError when the file is not an unencrypted Ed25519 PEM private key,
    OSError when it cannot be read.
    """
    try:
        key = serialization.load_pem_private_key(_read_private(Path(path)), password=None)
    except (ValueError, TypeError) as exc:
        raise SchemaError(f"{path} is not a PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SchemaError(f"{path} holds a {type(key).__name__}, expected an Ed25519 private key")
    return key


def load_public_key(path: Path) -> Ed25519PublicKey:
    """Load a PEM public key (or a base64 raw key on one line). Raises SchemaError when it is neither."""
    data = Path(path).read_bytes()
    if b"BEGIN" not in data:
        return public_from_b64(data.decode(errors="replace").strip())
    try:
        key = serialization.load_pem_public_key(data)
    except ValueError as exc:
        raise SchemaError(f"{path} is not a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SchemaError(f"{path} holds a {type(key).__name__}, expected an Ed25519 public key")
    return key


def sign_envelope(signed: Mapping[str, Any], *keys: Ed25519PrivateKey) -> dict[str, Any]:
    payload = canonical_bytes(signed)
    sigs = [
        {"keyid": key_id(k.public_key()), "sig": base64.b64encode(k.sign(payload)).decode()} for k in keys
    ]
    return {"signed": dict(signed), "signatures": sigs}


def envelope_json(envelope: Mapping[str, Any]) -> bytes:
    """A signed envelope (``sign_envelope``'s result) as compact JSON whose signed part is written canonically,
    i.e. as the exact bytes that were signed: ``{"signed":<canonical>,"signatures":[{"keyid":…,"sig":…}]}``.
    A verifier can then check the signature over the bytes as received instead of serialising the document
    again (the fleet server's ingest fast path). Raises SchemaError when the signed part has no canonical
    form."""
    sigs = json.dumps(list(envelope["signatures"]), separators=(",", ":"), ensure_ascii=False)
    return b'{"signed":' + canonical_bytes(envelope["signed"]) + b',"signatures":' + sigs.encode() + b"}"


def envelope_signatures(envelope: Any, what: str) -> tuple[dict[str, Any], list[tuple[str, bytes]]]:
    """Split an envelope into its signed part and (keyid, signature bytes) pairs; SchemaError if malformed."""
    if not isinstance(envelope, dict) or set(envelope) != {"signed", "signatures"}:
        raise SchemaError(f"{what} is not a signed envelope with exactly 'signed' and 'signatures'")
    signed, sigs = envelope["signed"], envelope["signatures"]
    if not isinstance(signed, dict):
        raise SchemaError(f"{what}: 'signed' must be an object")
    if not isinstance(sigs, list):
        raise SchemaError(f"{what}: 'signatures' must be a list")
    out: list[tuple[str, bytes]] = []
    for s in sigs:
        if not isinstance(s, dict) or not isinstance(s.get("keyid"), str) or not isinstance(s.get("sig"), str):
            raise SchemaError(f"{what}: each signature needs string 'keyid' and 'sig'")
        try:
            out.append((s["keyid"], base64.b64decode(s["sig"], validate=True)))
        except (binascii.Error, ValueError) as exc:  # ValueError: a non-ASCII character
            raise SchemaError(f"{what}: signature by {short(s['keyid'])} is not base64") from exc
    return signed, out


def verify_envelope(envelope: Any, trusted: Mapping[str, Ed25519PublicKey], what: str) -> tuple[dict[str, Any], str]:
    """Return (signed, keyid) for the first valid signature by a key in ``trusted``.

    Raises SignatureError when the envelope is unsigned, signed only by keys outside ``trusted``, or a
    trusted key's signature does not verify (tampering).
    """
    signed, sigs = envelope_signatures(envelope, what)
    if not sigs:
        raise UnsignedError(f"{what} is unsigned: it carries no signature")
    payload = canonical_bytes(signed)
    bad: list[str] = []
    for keyid, sig in sigs:
        key = trusted.get(keyid)
        if key is None:
            continue
        try:
            key.verify(sig, payload)
            return signed, keyid
        except InvalidSignature:
            bad.append(keyid)
    if bad:
        raise TamperedError(
            f"{what}: signature by key {short(bad[0])} does not verify (the document was altered after signing)"
        )
    seen = ", ".join(short(k) for k, _ in sigs)
    names = ", ".join(short(k) for k in trusted) or "none"
    raise UntrustedKeyError(f"{what} is signed by key {seen}, which is not trusted; trusted keys: {names}")
