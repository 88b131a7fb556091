"""The device's trust store: pinned keys, the newest accepted keyset and a clock high-water mark.

Files (see ``device_agent.config.DeviceDir``)::

    keys/root.pub    pinned root public key: the only trust anchor for packages
    keys/fleet.pub   pinned fleet public key: verifies desired-state commands
    trust.json       {"spec": 1, "keyset": <root-signed envelope | null>, "keyset_version": N,
                      "high_water": "<UTC time>", "clock_went_back": N, "clock_went_back_last": <event | null>}
                     (mode 0600; written atomically under an flock of the device folder, re-read first)

The keyset in ``trust.json`` is the newest one the device has accepted; it is re-verified against the pinned
root whenever it is loaded (a hand-edited trust.json is refused, not trusted), and it only ever moves
forward: a package carrying an older keyset is judged by the stored one, so revocations stick.

``high_water`` is the latest time the device has seen: the wall clock at each successful verification,
every verified manifest's ``created``, and the wall clock whenever a decision asks for the time and it has
moved more than ``OBSERVE_STEP`` past the mark (so the mark follows the clock between installs, with at most
one write per step). Verification uses ``now = max(wall clock, high_water)``, so a clock set back (dead RTC
battery, a board that boots in 1970, an attacker with access to NTP) cannot revive expired keys, keysets,
packages or desired states. A wall clock more than ``CLOCK_SLACK`` behind the mark is a ``clock_went_back``
event: logged as a warning and counted in trust.json (``clock_went_back``, with the last event's wall time and
mark). The price: a wall clock that was once far in the future keeps "now" there; re-provision to reset it.

The decisions (``TrustState.effective_now``, ``TrustState.after``) are pure; ``TrustStore`` is the I/O shell.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from edgefleet_contracts.archive import VerifiedPackage, carried_keyset, open_package
from edgefleet_contracts.atomic import atomic_write_text
from edgefleet_contracts.canonical import parse_json
from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.keyset import Keyset
from edgefleet_contracts.signing import Ed25519PublicKey, load_public_key
from edgefleet_contracts.timeutil import fmt, parse, utcnow
from edgefleet_contracts.trust import verify_keyset

from .config import DeviceDir
from .errors import AgentError

log = logging.getLogger(__name__)

TRUST_SPEC = 1
TRUST_MODE = 0o600
# A wall clock this far behind the high-water mark is a "clock_went_back" event (a packager's clock a little
# ahead of the device's, or NTP slewing, is not).
CLOCK_SLACK = timedelta(minutes=5)
# The mark follows the wall clock in steps of at least this much (bounds the writes to trust.json).
OBSERVE_STEP = timedelta(minutes=10)

__all__ = ["CLOCK_SLACK", "OBSERVE_STEP", "TRUST_MODE", "TRUST_SPEC", "TrustState", "TrustStore", "TrustStoreError",
           "load_pinned_key"]


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
    clock_went_back: int = 0  # how many times a decision found the wall clock behind the mark
    clock_went_back_last: dict[str, str] | None = None  # {"wall", "mark"} of the latest such event

    @classmethod
    def fresh(cls, now: datetime) -> TrustState:
        return cls(None, 0, now)

    def effective_now(self, wall: datetime) -> datetime:
        """The time verification uses: never earlier than the latest trusted time already seen."""
        return max(wall, self.high_water)

    def clock_is_back(self, wall: datetime) -> bool:
        """True when ``wall`` is more than ``CLOCK_SLACK`` behind the high-water mark."""
        return wall < self.high_water - CLOCK_SLACK

    def observed(self, wall: datetime) -> TrustState:
        """The state after a decision read the wall clock: a ``clock_went_back`` event counted when the clock
        is behind the mark; the mark moved to ``wall`` when the clock is ``OBSERVE_STEP`` or more past it."""
        if self.clock_is_back(wall):
            return replace(self, clock_went_back=self.clock_went_back + 1,
                           clock_went_back_last={"wall": fmt(wall), "mark": fmt(self.high_water)})
        if wall >= self.high_water + OBSERVE_STEP:
            return replace(self, high_water=wall)
        return self

    def after(self, vp: VerifiedPackage, envelope: dict[str, Any], wall: datetime) -> TrustState:
        """The state after ``vp`` fully verified: keyset only forward, high-water only forward."""
        hw = max(self.high_water, wall, vp.manifest.created)
        if vp.keyset.version > self.keyset_version:
            return replace(self, keyset_envelope=envelope, keyset_version=vp.keyset.version, high_water=hw)
        return replace(self, high_water=hw)

    def to_json(self) -> str:
        doc = {"spec": TRUST_SPEC, "keyset": self.keyset_envelope, "keyset_version": self.keyset_version,
               "high_water": fmt(self.high_water), "clock_went_back": self.clock_went_back,
               "clock_went_back_last": self.clock_went_back_last}
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
            back = doc.get("clock_went_back", 0)
            if not isinstance(back, int) or isinstance(back, bool) or back < 0:
                raise TrustStoreError(f"{source}: clock_went_back must be a whole number")
            last = doc.get("clock_went_back_last")
            if last is not None and not (isinstance(last, dict) and all(isinstance(v, str) for v in last.values())):
                raise TrustStoreError(f"{source}: clock_went_back_last must be an object of strings or null")
            return cls(env, version, parse(doc.get("high_water"), f"{source}: high_water"), back, last)
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
        """``max(wall clock, high-water mark)``: the time a decision (desired state, rollback) uses.

        Also records what the clock reading teaches (``TrustState.observed``): a ``clock_went_back`` event
        (logged, counted) or a mark moved forward. Raises TrustStoreError when that cannot be persisted."""
        wall = self.clock()
        self._observe(wall)
        return self.state.effective_now(wall)

    def advance(self) -> bool:
        """Move the high-water mark to the wall clock when it is ``OBSERVE_STEP`` or more past it (at most one
        write per step); True when it moved. Called periodically (the runner's housekeeping), so an idle device
        keeps its mark close to the present: a clock set back later is caught against a recent mark, not the
        time of the last install. A clock behind the mark is not counted here (decisions count it, once each).
        Raises TrustStoreError when the move cannot be persisted."""
        wall = self.clock()
        if wall < self.state.high_water + OBSERVE_STEP:
            return False
        self._update(lambda s: replace(s, high_water=max(s.high_water, wall)))
        return True

    def _observe(self, wall: datetime) -> None:
        if self.state.observed(wall) == self.state:
            return  # nothing to record: no write, no lock
        if self.state.clock_is_back(wall):
            log.warning("clock_went_back: the wall clock reads %s, behind the latest time seen %s; expiry is "
                        "judged at %s", fmt(wall), fmt(self.state.high_water), fmt(self.state.high_water))
        self._update(lambda s: s.observed(wall))

    def trusted_keyset(self) -> Keyset | None:
        """The newest accepted keyset, re-verified against the pinned root. Raises TrustStoreError."""
        env = self.state.keyset_envelope
        if env is None:
            return None
        try:
            ks = verify_keyset(env, self.root, self.state.effective_now(self.clock()), allow_expired=True)
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
        self._observe(wall)
        carried = carried_keyset(Path(pkg))
        vp = open_package(Path(pkg), self.root, now=self.state.effective_now(wall), target=target,
                          trusted_keyset=self.trusted_keyset(), staging=staging)
        envelope: dict[str, Any] = {}
        if vp.keyset.version > self.state.keyset_version:
            envelope = self._same_keyset(carried, vp.keyset)
        if self.state.after(vp, envelope, wall) != self.state:
            self._update(lambda s: s.after(vp, envelope, wall))
        return vp

    def _same_keyset(self, envelope: object, decided: Keyset) -> dict[str, Any]:
        """``envelope`` (read before verification) if it is exactly the keyset that decided; else refuse."""
        try:
            ks = verify_keyset(envelope, self.root, self.state.effective_now(self.clock()), allow_expired=True)
        except ContractError:
            ks = None
        if ks is None or not isinstance(envelope, dict) or ks.to_signed() != decided.to_signed():
            raise TrustStoreError("the package file changed while it was being verified; install it again")
        return envelope

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """An exclusive flock of the device folder: the agent, its desired-state worker and a CLI install may
        all write trust.json; each re-reads it under this lock, so none undoes another's newer keyset."""
        try:
            fd = os.open(self.device.path, os.O_RDONLY)
        except OSError as exc:
            raise TrustStoreError(f"cannot open the device folder {self.device.path}: {exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _update(self, change: Callable[[TrustState], TrustState]) -> None:
        """Apply ``change`` to trust.json as it is on disk now (not as this object last read it), atomically."""
        with self._locked():
            current = self._load()
            new = change(current)
            if new != current:
                try:
                    atomic_write_text(self.device.trust_file, new.to_json(), mode=TRUST_MODE)
                except OSError as exc:
                    raise TrustStoreError(f"cannot write {self.device.trust_file}: {exc}") from None
            self.state = new

    # ---- provisioning ---------------------------------------------------------------------------------
    @staticmethod
    def initialise(device: DeviceDir, now: datetime) -> None:
        """Write a fresh trust.json (no keyset yet, high-water = ``now``)."""
        atomic_write_text(device.trust_file, TrustState.fresh(now).to_json(), mode=TRUST_MODE)
