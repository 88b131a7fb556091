"""The keyset: the package-signing keys the offline root delegates to, each with an expiry.

Signed by the root key. Revocation is a newer keyset version that drops the key and lists it under
``revoked``; a verifier remembers the highest version it has accepted and refuses older ones (replay).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import _fields as f
from .errors import SchemaError
from .signing import Ed25519PublicKey, key_id, public_b64, public_from_b64
from .timeutil import fmt, parse

KEYSET_TYPE = "edgefleet.keyset"
KEYSET_SPEC = 1


@dataclass(frozen=True)
class DelegatedKey:
    keyid: str
    public: Ed25519PublicKey
    expires: datetime


@dataclass(frozen=True)
class Keyset:
    version: int
    issued: datetime
    expires: datetime
    keys: dict[str, DelegatedKey] = field(default_factory=dict)
    revoked: frozenset[str] = frozenset()

    @classmethod
    def from_signed(cls, signed: dict[str, Any]) -> Keyset:
        """Validate the ``signed`` part of a keyset envelope; raises SchemaError naming the bad field."""
        what = "keyset"
        signed = f.obj(signed, what)
        f.const(signed, "type", KEYSET_TYPE, what)
        f.const(signed, "spec", KEYSET_SPEC, what)
        version = f.integer(signed, "version", what, minimum=1)
        keys_raw = f.obj(signed.get("keys"), "keyset.keys")
        keys: dict[str, DelegatedKey] = {}
        for kid, entry in keys_raw.items():
            e = f.obj(entry, f"keyset.keys[{kid[:12]}]")
            pub = public_from_b64(f.string(e, "public", f"keyset.keys[{kid[:12]}]"))
            if key_id(pub) != kid:
                raise SchemaError(f"keyset key id {kid[:12]}… does not match its public key")
            keys[kid] = DelegatedKey(kid, pub, parse(e.get("expires"), f"keyset.keys[{kid[:12]}].expires"))
        revoked = f.array(signed, "revoked", what)
        if not all(isinstance(r, str) for r in revoked):
            raise SchemaError("keyset.revoked must be a list of key ids")
        return cls(
            version=version,
            issued=parse(signed.get("issued"), "keyset.issued"),
            expires=parse(signed.get("expires"), "keyset.expires"),
            keys=keys,
            revoked=frozenset(revoked),
        )

    def to_signed(self) -> dict[str, Any]:
        return {
            "type": KEYSET_TYPE,
            "spec": KEYSET_SPEC,
            "version": self.version,
            "issued": fmt(self.issued),
            "expires": fmt(self.expires),
            "keys": {k.keyid: {"public": public_b64(k.public), "expires": fmt(k.expires)} for k in self.keys.values()},
            "revoked": sorted(self.revoked),
        }
