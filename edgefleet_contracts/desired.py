"""Desired state: what the server wants one device to run. Published retained on ``…/<device>/desired``.

Signed by the fleet key (pinned on each device at provisioning) with a per-device monotonically increasing
``seq`` and an ``expires`` time. A device accepts it only if the signature verifies with the pinned fleet key,
``device_id`` is its own, ``seq`` is newer than the last it accepted (replays change nothing), it has not
expired, and the package it names is then verified like any package (root-signed manifest, hashes). The
``sha256`` and ``length`` bound the download: a device never reads past ``length`` and discards a file whose
hash differs.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from . import _fields as f
from .errors import ExpiredError, RollbackError, SchemaError
from .signing import Ed25519PrivateKey, Ed25519PublicKey, key_id, sign_envelope, verify_envelope
from .timeutil import fmt, parse
from .topics import check_id
from .versions import parse_version

DESIRED_TYPE = "edgefleet.desired"
DESIRED_SPEC = 1
_SHA = re.compile(r"\A[0-9a-f]{64}\Z")


class WrongDeviceError(SchemaError):
    """A desired state addressed to another device."""

    reason = "wrong_device"


@dataclass(frozen=True)
class Desired:
    device_id: str
    seq: int
    name: str
    version: str
    url: str  # where to download the package (HTTP, Range supported)
    sha256: str
    length: int
    issued: datetime
    expires: datetime
    rollout: str = ""  # rollout id, for the audit trail
    reason: str = ""  # "rollout stage 2", "rollback: p95 latency gate", …

    def to_signed(self) -> dict[str, Any]:
        return {"type": DESIRED_TYPE, "spec": DESIRED_SPEC, "device_id": self.device_id, "seq": self.seq,
                "model": {"name": self.name, "version": self.version},
                "package": {"url": self.url, "sha256": self.sha256, "length": self.length},
                "issued": fmt(self.issued), "expires": fmt(self.expires), "rollout": self.rollout,
                "reason": self.reason}

    @classmethod
    def from_signed(cls, d: Any) -> Desired:
        """Raises SchemaError naming the bad field."""
        w = "desired"
        d = f.obj(d, w)
        f.const(d, "type", DESIRED_TYPE, w)
        f.const(d, "spec", DESIRED_SPEC, w)
        model = f.obj(d.get("model"), "desired.model")
        pkg = f.obj(d.get("package"), "desired.package")
        version = f.string(model, "version", "desired.model")
        parse_version(version)
        sha = f.string(pkg, "sha256", "desired.package")
        if not _SHA.match(sha):
            raise SchemaError("desired.package.sha256 must be 64 lowercase hex digits")
        url = f.string(pkg, "url", "desired.package")
        if not (url.startswith("http://") or url.startswith("https://")):
            raise SchemaError("desired.package.url must be an http(s) URL")
        return cls(
            device_id=check_id(f.string(d, "device_id", w), "desired.device_id"),
            seq=f.integer(d, "seq", w, minimum=1),
            name=f.string(model, "name", "desired.model"), version=version, url=url, sha256=sha,
            length=f.integer(pkg, "length", "desired.package", minimum=1),
            issued=parse(d.get("issued"), "desired.issued"), expires=parse(d.get("expires"), "desired.expires"),
            rollout=str(d.get("rollout", "")), reason=str(d.get("reason", "")),
        )


def sign_desired(desired: Desired, fleet_key: Ed25519PrivateKey) -> dict[str, Any]:
    return sign_envelope(desired.to_signed(), fleet_key)


def accept_desired(envelope: Any, fleet_pub: Ed25519PublicKey, *, device_id: str, last_seq: int,
                   now: datetime) -> Desired:
    """The device's decision on a desired-state message (pure: no I/O, no clock).

    Raises UnsignedError / UntrustedKeyError / TamperedError (signature), SchemaError, WrongDeviceError,
    RollbackError (seq not newer: a replay), ExpiredError.
    """
    signed, _ = verify_envelope(envelope, {key_id(fleet_pub): fleet_pub}, "desired state")
    d = Desired.from_signed(signed)
    if d.device_id != device_id:
        raise WrongDeviceError(f"desired state is addressed to {d.device_id!r}, not this device ({device_id!r})")
    if d.seq <= last_seq:
        raise RollbackError(f"desired state seq {d.seq} is not newer than {last_seq} already accepted (replay)")
    if d.expires <= now:
        raise ExpiredError(f"desired state seq {d.seq} expired at {fmt(d.expires)}")
    return d
