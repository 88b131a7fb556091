"""The device's trust store: pinned keys, the newest accepted keyset and a clock high-water mark.

Files (see ``device_agent.config.DeviceDir``)::

    keys/root.pub    pinned root public key: the only trust anchor for packages
    keys/fleet.pub   pinned fleet public key: verifies desired-state commands
    trust.json       {"spec": 1, "keyset": <root-signed envelope | null>, "keyset_version": N,
                      "high_water": "<UTC time>"}

The keyset in ``trust.json`` is the newest one the device has accepted; it is re-verified against the pinned
root whenever it is loaded (a hand-edited trust.json is refused, not trusted), and it only ever moves
forward: a package carrying an older keyset is judged by the stored one, so revocations stick.

``high_water`` is the latest trusted time the device has seen: the wall clock at each successful
verification and every verified manifest's ``created``. Verification uses ``now = max(wall clock,
high_water)``, so a clock set back (dead RTC battery, a board that boots in 1970, an attacker with access to
NTP) cannot revive expired keys, keysets or packages. The price: a wall clock that was once far in the future
when a package verified keeps "now" there; re-provision to reset it.

The decisions (``TrustState.effective_now``, ``TrustState.after``) are pure; ``TrustStore`` is the I/O shell.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from edgefleet_contracts.archive import MAX_METADATA_BYTES, VerifiedPackage, open_package
from edgefleet_contracts.atomic import atomic_write_text
from edgefleet_contracts.canonical import parse_json
from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.keyset import Keyset
from edgefleet_contracts.manifest import KEYSET_NAME
from edgefleet_contracts.signing import Ed25519PublicKey, load_public_key
from edgefleet_contracts.timeutil import fmt, parse, utcnow
from edgefleet_contracts.trust import verify_keyset

from .config import DeviceDir
from .errors import AgentError

TRUST_SPEC = 1

__all__ = ["TRUST_SPEC", "TrustState", "TrustStore", "TrustStoreError", "load_pinned_key"]


class TrustStoreError(AgentError):
    """A pinned key or trust.json is missing or unusable; the message says which file and what to do."""

    reason = "trust_store"


def load_pinned_key(path: Path, what: str) -> Ed25519PublicKey:
    """Load an Ed25519 public key (PEM or one-line base64). Raises TrustStoreError naming ``what`` and the file."""
    try:
        return load_public_key(Path(path))
    except FileNotFoundError:
        raise TrustStoreError(f"{what} {path} does not exist") from None
    except (OSError, ContractError, ValueError) as exc:
        raise TrustStoreError(f"{what} {path} is not an Ed25519 public key: {exc}") from None


@dataclass(frozen=True)
class TrustState:
    """What trust.json holds. ``keyset_envelope`` is kept verbatim so the root signature can be re-checked."""

    keyset_envelope: dict[str, Any] | None
    keyset_version: int
    high_water: datetime

    @classmethod
    def fresh(cls, now: datetime) -> TrustState:
        return cls(None, 0, now)

    def effective_now(self, wall: datetime) -> datetime:
        """The time verification uses: never earlier than the latest trusted time already seen."""
        return max(wall, self.high_water)

    def after(self, vp: VerifiedPackage, envelope: dict[str, Any], wall: datetime) -> TrustState:
        """The state after ``vp`` fully verified: keyset only forward, high-water only forward."""
        hw = max(self.high_water, wall, vp.manifest.created)
        if vp.keyset.version > self.keyset_version:
            return TrustState(envelope, vp.keyset.version, hw)
        return TrustState(self.keyset_envelope, self.keyset_version, hw)

    def to_json(self) -> str:
        doc = {"spec": TRUST_SPEC, "keyset": self.keyset_envelope, "keyset_version": self.keyset_version,
               "high_water": fmt(self.high_water)}
        return json.dumps(doc, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, data: bytes, source: str) -> TrustState:
        """Raises TrustStoreError when the document is not a trust.json."""
        try:
            doc = parse_json(data, what=source)
            if not isinstance(doc, dict) or doc.get("spec") != TRUST_SPEC:
                raise TrustStoreError(f"{source} is not a trust store (spec {TRUST_SPEC})")
            env = doc.get("keyset")
            version = doc.get("keyset_version")
            if env is not None and not isinstance(env, dict):
                raise TrustStoreError(f"{source}: keyset must be a signed envelope or null")
            if not isinstance(version, int) or isinstance(version, bool) or version < 0:
                raise TrustStoreError(f"{source}: keyset_version must be a whole number")
            return cls(env, version, parse(doc.get("high_water"), f"{source}: high_water"))
        except ContractError as exc:
            raise TrustStoreError(f"{source} is unreadable: {exc}; re-provision the device") from None


class TrustStore:
    """The device folder's trust files. ``clock`` is the wall clock (injectable for tests)."""

    def __init__(self, device: DeviceDir, *, clock: Callable[[], datetime] = utcnow) -> None:
        """Raises TrustStoreError when a pinned key or trust.json is missing or invalid."""
        self.device = device
        self.clock = clock
        self.root = load_pinned_key(device.root_pub, "pinned root key")
        self.fleet = load_pinned_key(device.fleet_pub, "pinned fleet key")
        self.state = self._load()

    # ---- reading --------------------------------------------------------------------------------------
    def _load(self) -> TrustState:
        path = self.device.trust_file
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise TrustStoreError(f"{path} is missing; re-provision the device (`device-agent provision`)") from None
        except OSError as exc:
            raise TrustStoreError(f"cannot read {path}: {exc}") from None
        return TrustState.from_json(data, str(path))

    def now(self) -> datetime:
        """``max(wall clock, high-water mark)``: the time every verification uses."""
        return self.state.effective_now(self.clock())

    def trusted_keyset(self) -> Keyset | None:
        """The newest accepted keyset, re-verified against the pinned root. Raises TrustStoreError."""
        env = self.state.keyset_envelope
        if env is None:
            return None
        try:
            ks = verify_keyset(env, self.root, self.now(), allow_expired=True)
        except ContractError as exc:
            raise TrustStoreError(
                f"{self.device.trust_file}: stored keyset does not verify against the pinned root ({exc}); "
                "re-provision the device"
            ) from None
        if ks.version != self.state.keyset_version:
            raise TrustStoreError(f"{self.device.trust_file}: keyset_version {self.state.keyset_version} does not "
                                  f"match the stored keyset's version {ks.version}; re-provision the device")
        return ks

    # ---- verifying ------------------------------------------------------------------------------------
    def verify_package(self, pkg: Path, staging: Path | None, target: str) -> VerifiedPackage:
        """Verify ``pkg`` fully (extracting into ``staging`` when given), then persist what it taught us.

        Only after the whole package verified: a newer keyset it carries becomes the stored one, and the
        high-water mark moves to ``max(high-water, wall clock, manifest.created)``.
        Raises ContractError subclasses (the package's fault) or TrustStoreError (the device's).
        """
        wall = self.clock()
        carried = _carried_keyset(Path(pkg))
        vp = open_package(Path(pkg), self.root, now=self.state.effective_now(wall), target=target,
                          trusted_keyset=self.trusted_keyset(), staging=staging)
        envelope: dict[str, Any] = {}
        if vp.keyset.version > self.state.keyset_version:
            envelope = self._same_keyset(carried, vp.keyset)
        new = self.state.after(vp, envelope, wall)
        if new != self.state:
            self._save(new)
        return vp

    def _same_keyset(self, envelope: object, decided: Keyset) -> dict[str, Any]:
        """``envelope`` (read before verification) if it is exactly the keyset that decided; else refuse."""
        try:
            ks = verify_keyset(envelope, self.root, self.now(), allow_expired=True)
        except ContractError:
            ks = None
        if ks is None or not isinstance(envelope, dict) or ks.to_signed() != decided.to_signed():
            raise TrustStoreError("the package file changed while it was being verified; install it again")
        return envelope

    def _save(self, state: TrustState) -> None:
        atomic_write_text(self.device.trust_file, state.to_json(), mode=0o644)
        self.state = state

    # ---- provisioning ---------------------------------------------------------------------------------
    @staticmethod
    def initialise(device: DeviceDir, now: datetime) -> None:
        """Write a fresh trust.json (no keyset yet, high-water = ``now``)."""
        atomic_write_text(device.trust_file, TrustState.fresh(now).to_json())


def _carried_keyset(pkg: Path) -> object:
    """The package's ``keyset.json`` document, unverified (None when unreadable: open_package then says why)."""
    try:
        with tarfile.open(pkg, mode="r:") as tar:
            m = tar.next()
            if m is None or m.name != KEYSET_NAME or not m.isreg() or m.size > MAX_METADATA_BYTES:
                return None
            fh = tar.extractfile(m)
            return None if fh is None else parse_json(fh.read(m.size), what=KEYSET_NAME)
    except (tarfile.TarError, OSError, ContractError):
        return None
