"""The packager's key folder: an offline root key, package-signing keys and the signed keyset.

Layout of KEYDIR::

    root.key          Ed25519 root private key (0600). Keep it offline; it only signs keysets.
    root.pub          the root public key that every device pins at provisioning
    signing-<id>.key  package-signing private keys (0600), one per rotation
    current-signing-key  id of the key new packages are signed with
    keyset.json       the current keyset, signed by the root (its version grows on rotate/revoke)
    keysets/v<N>.json every published keyset version (history)

Decisions: a rotation keeps the previous signing key in the keyset until its own expiry so packages already
signed stay installable; a revocation drops the key and lists it under ``revoked`` in a new version. New
packages are always signed with the newest live key.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from edgefleet_contracts.atomic import atomic_write_text
from edgefleet_contracts.canonical import parse_json
from edgefleet_contracts.errors import ContractError, ExpiredError
from edgefleet_contracts.keyset import DelegatedKey, Keyset
from edgefleet_contracts.signing import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
    generate_key,
    key_id,
    load_private_key,
    load_public_key,
    save_private_key,
    save_public_key,
    sign_envelope,
)
from edgefleet_contracts.timeutil import utcnow
from edgefleet_contracts.trust import verify_keyset

from .errors import FlagError, KeysError

DEFAULT_KEY_LIFETIME = timedelta(days=365)
DEFAULT_KEYSET_LIFETIME = timedelta(days=365)


@dataclass(frozen=True)
class KeyFolder:
    path: Path

    @property
    def root_key(self) -> Path:
        return self.path / "root.key"

    @property
    def root_pub(self) -> Path:
        return self.path / "root.pub"

    @property
    def keyset_file(self) -> Path:
        return self.path / "keyset.json"

    @property
    def current_file(self) -> Path:
        """Names the signing key new packages use (the one added by the latest init/rotate)."""
        return self.path / "current-signing-key"

    def signing_key_file(self, keyid: str) -> Path:
        return self.path / f"signing-{keyid[:16]}.key"

    def _read(self, path: Path) -> bytes:
        """The bytes of a file of the folder; KeysError when it is missing, not a file, or unreadable."""
        if not path.exists():
            raise KeysError(f"{path} is missing; run `model-packager keys init --dir {self.path}`")
        if not path.is_file():
            raise KeysError(f"{path} is not a file; the key folder {self.path} is damaged")
        try:
            return path.read_bytes()
        except OSError as exc:
            raise KeysError(f"cannot read {path}: {exc.strerror or exc}") from exc

    def root_public(self) -> Ed25519PublicKey:
        self._read(self.root_pub)
        try:
            return load_public_key(self.root_pub)
        except (ContractError, OSError, ValueError) as exc:
            raise KeysError(f"{self.root_pub} is not a root public key: {exc}") from exc

    def keyset_envelope(self) -> dict[str, Any]:
        env = parse_json(self._read(self.keyset_file), what=str(self.keyset_file))
        if not isinstance(env, dict):
            raise KeysError(f"{self.keyset_file} is not a keyset envelope")
        return env

    def keyset(self, now: datetime | None = None, *, allow_expired: bool = False) -> Keyset:
        """The folder's keyset, verified against its root key. ``allow_expired``: an expired keyset is still
        returned (rotate and revoke publish its successor). Raises KeysError."""
        try:
            return verify_keyset(self.keyset_envelope(), self.root_public(), now or utcnow(),
                                 allow_expired=allow_expired)
        except ExpiredError as exc:
            raise KeysError(f"{self.keyset_file}: {exc}: run `model-packager keys rotate --dir {self.path}` "
                            "(with the root key present)") from exc
        except ContractError as exc:
            raise KeysError(f"{self.keyset_file}: {exc}") from exc

    def signing_key(self, now: datetime | None = None) -> tuple[Ed25519PrivateKey, Keyset]:
        """The newest live signing key with a private key file here, and the keyset delegating it."""
        now = now or utcnow()
        ks = self.keyset(now)
        live = [k for k in ks.keys.values() if k.keyid not in ks.revoked and k.expires > now]
        current = self.current_file.read_text().strip() if self.current_file.exists() else ""
        live.sort(key=lambda k: (k.keyid == current, k.expires), reverse=True)
        for k in live:
            f = self.signing_key_file(k.keyid)
            if f.exists():
                try:
                    key = load_private_key(f)  # an insecure or malformed file: its ContractError says so
                except OSError as exc:
                    raise KeysError(f"cannot read signing key {f}: {exc.strerror or exc}") from exc
                if key_id(key.public_key()) != k.keyid:
                    raise KeysError(
                        f"signing key {f} holds key {key_id(key.public_key())[:16]}, not key {k.keyid[:16]} that "
                        f"keyset v{ks.version} delegates: packages signed with it would be refused by every "
                        "device; restore the right file or run `model-packager keys rotate`")
                return key, ks
        raise KeysError(
            f"no live signing key in {self.path} (keyset version {ks.version}); run `model-packager keys rotate`"
        )


def _publish(folder: KeyFolder, root: Ed25519PrivateKey, ks: Keyset) -> dict[str, Any]:
    env = sign_envelope(ks.to_signed(), root)
    text = json.dumps(env, indent=2, sort_keys=True) + "\n"
    atomic_write_text(folder.path / "keysets" / f"v{ks.version}.json", text)
    atomic_write_text(folder.keyset_file, text)
    return env


def _new_signing_key(folder: KeyFolder, lifetime: timedelta, now: datetime) -> DelegatedKey:
    key = generate_key()
    kid = key_id(key.public_key())
    save_private_key(key, folder.signing_key_file(kid))
    save_public_key(key.public_key(), folder.path / f"signing-{kid[:16]}.pub")
    atomic_write_text(folder.current_file, kid + "\n")
    return DelegatedKey(kid, key.public_key(), now + lifetime)


def init_keys(
    path: Path,
    *,
    key_lifetime: timedelta = DEFAULT_KEY_LIFETIME,
    keyset_lifetime: timedelta = DEFAULT_KEYSET_LIFETIME,
    now: datetime | None = None,
) -> KeyFolder:
    """Create root key, first signing key and keyset v1. Raises KeysError if a root key already exists, FlagError
    if a lifetime is not positive (the key or keyset would be born expired)."""
    now = now or utcnow()
    _check_lifetime("--key-lifetime", key_lifetime)
    _check_lifetime("--keyset-lifetime", keyset_lifetime)
    folder = KeyFolder(Path(path))
    if folder.root_key.exists() or folder.keyset_file.exists():
        raise KeysError(f"{path} already holds keys; refusing to overwrite them")
    folder.path.mkdir(parents=True, exist_ok=True)
    folder.path.chmod(0o700)
    root = generate_key()
    save_private_key(root, folder.root_key)
    save_public_key(root.public_key(), folder.root_pub)
    signing = _new_signing_key(folder, key_lifetime, now)
    ks = Keyset(version=1, issued=now, expires=now + keyset_lifetime, keys={signing.keyid: signing})
    _publish(folder, root, ks)
    return folder


def _check_lifetime(flag: str, lifetime: timedelta) -> None:
    if lifetime <= timedelta(0):
        raise FlagError(f"{flag} must be longer than 0: a key or keyset that is born expired signs nothing a "
                        "device accepts")


def _root_private(folder: KeyFolder) -> Ed25519PrivateKey:
    if not folder.root_key.exists():
        raise KeysError(f"{folder.root_key} is missing: the root key must be present (brought back from offline) "
                        "to publish a new keyset")
    return load_private_key(folder.root_key)


def rotate_keys(
    path: Path,
    *,
    key_lifetime: timedelta = DEFAULT_KEY_LIFETIME,
    keyset_lifetime: timedelta = DEFAULT_KEYSET_LIFETIME,
    now: datetime | None = None,
) -> Keyset:
    """Add a new signing key and publish keyset version+1 (older live keys stay until they expire). Works from
    an expired keyset too: rotating is how a lapsed keyset is renewed. Raises KeysError, FlagError."""
    now = now or utcnow()
    _check_lifetime("--key-lifetime", key_lifetime)
    _check_lifetime("--keyset-lifetime", keyset_lifetime)
    folder = KeyFolder(Path(path))
    root = _root_private(folder)
    old = folder.keyset(now, allow_expired=True)
    signing = _new_signing_key(folder, key_lifetime, now)
    keys = {k: v for k, v in old.keys.items() if v.expires > now}
    keys[signing.keyid] = signing
    ks = Keyset(old.version + 1, now, now + keyset_lifetime, keys, old.revoked)
    _publish(folder, root, ks)
    return ks


def revoke_key(path: Path, keyid_prefix: str, *, now: datetime | None = None) -> Keyset:
    """Publish keyset version+1 without the key (matched by id prefix, >= 8 hex digits) and listing it revoked.
    Works from an expired keyset too (its successor then lives DEFAULT_KEYSET_LIFETIME): a leaked key must stay
    revocable after a missed rotation. Raises KeysError."""
    now = now or utcnow()
    folder = KeyFolder(Path(path))
    root = _root_private(folder)
    old = folder.keyset(now, allow_expired=True)
    if len(keyid_prefix) < 8:
        raise KeysError("give at least 8 hex digits of the key id to revoke")
    matches = [k for k in old.keys if k.startswith(keyid_prefix.lower())]
    gone = [k for k in old.revoked if k.startswith(keyid_prefix.lower())]
    if not matches and len(gone) == 1:
        raise KeysError(f"key {gone[0][:16]} is already revoked, since keyset v{_revoked_in(folder, gone[0], old)} "
                        f"(the current keyset is v{old.version}); nothing was published")
    if len(matches) != 1:
        known = ", ".join(k[:16] for k in old.keys)
        raise KeysError(f"key id {keyid_prefix!r} matches {len(matches)} keys in keyset v{old.version}; keys: {known}")
    kid = matches[0]
    keys = {k: v for k, v in old.keys.items() if k != kid}
    ks = Keyset(old.version + 1, now, old.expires if old.expires > now else now + DEFAULT_KEYSET_LIFETIME,
                keys, old.revoked | {kid})
    _publish(folder, root, ks)
    return ks


def _revoked_in(folder: KeyFolder, kid: str, current: Keyset) -> int:
    """The first keyset version that lists ``kid`` as revoked, from the folder's history (``keysets/v<N>.json``);
    the current version when the history does not say."""
    first = current.version
    for f in (folder.path / "keysets").glob("v*.json"):
        try:
            signed = parse_json(f.read_bytes(), what=str(f))["signed"]
            version, revoked = int(signed["version"]), signed["revoked"]
        except (OSError, ContractError, KeyError, TypeError, ValueError):
            continue  # a damaged history entry: the message then names a later version, never a wrong earlier one
        if isinstance(revoked, list) and kid in revoked:
            first = min(first, version)
    return first
