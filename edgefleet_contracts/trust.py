"""Trust decisions over plain data: is this keyset from our root, is this manifest from a delegated key?

No files, sockets or clocks here: the caller passes ``now`` and the highest keyset version it already
trusts, so every rule is tested exhaustively and fast (the python-tuf ``trusted_metadata_set`` idea).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from .errors import ExpiredError, RevokedKeyError, RollbackError, TargetMismatchError, UntrustedKeyError
from .keyset import Keyset
from .manifest import Manifest
from .signing import Ed25519PublicKey, envelope_signatures, key_id, short, verify_envelope
from .timeutil import fmt


def verify_keyset(
    envelope: Any, root: Ed25519PublicKey, now: datetime, min_version: int = 0, *, allow_expired: bool = False
) -> Keyset:
    """Accept a keyset only if the root signed it, it has not expired and is not older than ``min_version``.

    Raises UnsignedError, UntrustedKeyError (not signed by the root), TamperedError, SchemaError,
    ExpiredError, RollbackError.
    """
    root_id = key_id(root)
    try:
        signed, _ = verify_envelope(envelope, {root_id: root}, "keyset")
    except UntrustedKeyError as exc:
        raise UntrustedKeyError(
            f"keyset is not signed by the trusted root key {short(root_id)}; {exc}"
        ) from None
    ks = Keyset.from_signed(signed)
    if ks.version < min_version:
        raise RollbackError(
            f"keyset version {ks.version} is older than version {min_version} already trusted "
            "(an old keyset replayed; rebuild the package with the current keyset)"
        )
    if ks.expires <= now and not allow_expired:
        raise ExpiredError(f"keyset version {ks.version} expired at {fmt(ks.expires)}; publish a new keyset")
    return ks


def verify_manifest(envelope: Any, keyset: Keyset, now: datetime) -> tuple[Manifest, str]:
    """Accept a manifest signed by a live, unrevoked key of ``keyset``; return it and the signer's key id.

    Raises UnsignedError, RevokedKeyError, UntrustedKeyError, TamperedError, ExpiredError (signing key or
    package), SchemaError.
    """
    live = {k.keyid: k.public for k in keyset.keys.values() if k.keyid not in keyset.revoked}
    try:
        signed, signer = verify_envelope(envelope, live, "manifest")
    except UntrustedKeyError:
        _, sigs = envelope_signatures(envelope, "manifest")
        revoked = [k for k, _ in sigs if k in keyset.revoked]
        if revoked:
            raise RevokedKeyError(
                f"manifest is signed by key {short(revoked[0])}, which keyset version {keyset.version} revokes"
            ) from None
        raise
    key = keyset.keys[signer]
    if key.expires <= now:
        raise ExpiredError(
            f"manifest is signed by key {short(signer)}, which expired at {fmt(key.expires)}; "
            "re-sign with a current key (model-packager keys rotate)"
        )
    manifest = Manifest.from_signed(signed)
    if manifest.expires <= now:
        raise ExpiredError(
            f"package {manifest.name} {manifest.version} expired at {fmt(manifest.expires)}; rebuild or re-sign it"
        )
    return manifest, signer


def check_target(manifest: Manifest, target: str | None) -> None:
    """Raises TargetMismatchError when ``target`` is given and differs from the package's."""
    if target is not None and manifest.target != target:
        raise TargetMismatchError(
            f"package {manifest.name} {manifest.version} is built for target {manifest.target!r}, "
            f"not {target!r}; build it with --target {target}"
        )
