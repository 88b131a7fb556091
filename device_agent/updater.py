"""Installing a model package into the A/B slots: an explicit state machine persisted on entry to each state.

States and transitions (``TRANSITIONS`` is the single source; ``Updater._enter`` refuses anything else)::

    idle ──install──▶ verifying ──▶ staging ──▶ smoke_test ──▶ activating ──▶ idle   (installed)
                          │            │            │
                          └────────────┴────────────┴──────────────────────▶ idle   (rejected | failed)
    idle ──rollback─▶ rolling_back ──▶ idle                                          (rolled_back)

* **verifying**: the whole package is verified (signatures chain to the pinned root, nothing expired by
  ``max(wall clock, high-water)``, target, every file's hash and length) without writing a byte; then the
  version must be newer than the active one of the same model name. A rejection here leaves both slots
  untouched, so the standby (previous version) survives a bad package.
* **staging**: the package is verified again while it is unpacked into ``slots/<inactive>.tmp`` (a second
  pass closes the gap between checking and extracting); the tree is fsynced and ``.complete`` written last.
* **smoke_test**: the staged model is loaded with the target's threads, the golden inputs are run and
  compared with the golden probabilities (tolerance from the package, same argmax); image packages first
  check that each golden image preprocesses to its golden row. Failure discards the staged folder; the active
  slot and the standby are untouched.
* **activating**: the staged folder replaces the inactive slot (the old standby) and ``active.json`` is
  replaced atomically to name it. The previous version stays in the other slot as the new standby.
* **rolling_back**: ``active.json`` is switched to the standby slot (ready, unexpired, files intact); no
  download.

``update.json`` holds the current state, why it was entered, the candidate, ``last_result`` and a short
history; every transition is also logged (logger ``device_agent.updater``). ``Updater.recover()`` runs at
every start-up: it discards staging/trash folders and incomplete slots, records an interrupted operation as
``failed`` (``interrupted during <state>``) and makes sure the pointer names a ready slot (else the other
ready slot, else no model).

Decisions:
* A package for a *different model name* than the active one is accepted (a device runs one model; switching
  it is an operator decision expressed by publishing a signed package for the device's target). Only the same
  name must move forward in version; going back is ``rollback`` to a version the device already holds.
* A newer keyset carried by a package is persisted as soon as the package verified, even if the smoke test
  later fails: it is root-signed trust metadata, independent of whether the model works here.
* A failed rollback (no ready standby) is recorded in ``last_result`` too: it is the latest update operation.

Test hook (failpoint): when the environment variable ``EDGEFLEET_FAILPOINT`` equals the name of a state, the
process SIGKILLs itself right after persisting entry to that state. The crash tests use it to prove that a
kill at any point leaves a device that serves exactly the old or the new model. Never set it in production.

Seam for the rollout path (issue 5): ``install`` takes an already-downloaded package path; a rollout adds
``downloading`` before ``verifying`` and ``probation`` → ``committed`` | ``rolling_back`` after
``activating`` by extending ``UpdateState`` and ``TRANSITIONS`` here, reusing the phase methods.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet_contracts.atomic import atomic_write_text
from edgefleet_contracts.errors import ContractError, SchemaError
from edgefleet_contracts.manifest import Manifest
from edgefleet_contracts.signing import short
from edgefleet_contracts.targets import Target
from edgefleet_contracts.timeutil import fmt, utcnow
from edgefleet_contracts.versions import is_newer

from .config import ConfigError, DeviceDir
from .errors import AgentError
from .slots import RESERVED, SLOT_NAMES, BusyError, SlotError, Slots, other
from .trust_store import TrustStore, TrustStoreError

log = logging.getLogger(__name__)

FAILPOINT_ENV = "EDGEFLEET_FAILPOINT"
IMAGE_ATOL = 1e-5
HISTORY_LENGTH = 20

__all__ = [
    "FAILPOINT_ENV",
    "TRANSITIONS",
    "GoldenVerdict",
    "IllegalTransitionError",
    "InstallResult",
    "NoStandbyError",
    "NotNewerError",
    "ReservedNameError",
    "SmokeTestError",
    "UpdateError",
    "UpdateState",
    "Updater",
    "check_newer",
    "compare_golden",
    "smoke_test",
]


# ---- errors -------------------------------------------------------------------------------------------
class UpdateError(AgentError):
    """Root of the updater's own refusals (the package's contract failures are ContractErrors)."""

    reason = "update"


class NotNewerError(UpdateError):
    """The package's version is not newer than the active one of the same model name."""

    reason = "not_newer"


class ReservedNameError(UpdateError):
    """The package lists a file under a name the agent reserves inside a slot."""

    reason = "reserved_name"


class SmokeTestError(UpdateError):
    """The staged model does not reproduce its golden outputs on this device (numbers in the message)."""

    reason = "smoke_test_failed"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.details = details or {}


class NoStandbyError(UpdateError):
    """Rollback asked for, but the other slot holds no ready (complete, smoke-tested) model."""

    reason = "no_standby"


class IllegalTransitionError(UpdateError):
    """A transition outside ``TRANSITIONS`` (a bug, never a user error)."""

    reason = "illegal_transition"


# ---- the state machine (pure) -------------------------------------------------------------------------
class UpdateState(StrEnum):
    IDLE = "idle"
    VERIFYING = "verifying"
    STAGING = "staging"
    SMOKE_TEST = "smoke_test"
    ACTIVATING = "activating"
    ROLLING_BACK = "rolling_back"


S = UpdateState
TRANSITIONS: dict[UpdateState, frozenset[UpdateState]] = {
    S.IDLE: frozenset({S.VERIFYING, S.ROLLING_BACK}),
    S.VERIFYING: frozenset({S.STAGING, S.IDLE}),
    S.STAGING: frozenset({S.SMOKE_TEST, S.IDLE}),
    S.SMOKE_TEST: frozenset({S.ACTIVATING, S.IDLE}),
    S.ACTIVATING: frozenset({S.IDLE}),
    S.ROLLING_BACK: frozenset({S.IDLE}),
}


def check_transition(current: UpdateState, new: UpdateState) -> None:
    """Raises IllegalTransitionError when ``current -> new`` is not in ``TRANSITIONS``."""
    if new not in TRANSITIONS[current]:
        allowed = ", ".join(sorted(TRANSITIONS[current]))
        raise IllegalTransitionError(f"update state {current} cannot go to {new} (allowed: {allowed})")


def check_newer(candidate: Manifest, active: Manifest | None) -> None:
    """Raises NotNewerError when ``candidate`` does not move the same model name forward."""
    if active is not None and candidate.name == active.name and not is_newer(candidate.version, active.version):
        raise NotNewerError(f"{candidate.version} is not newer than the active {active.version} "
                            f"(model {candidate.name}); to go back to a version this device holds, roll back")


def check_reserved(manifest: Manifest) -> None:
    """Raises ReservedNameError when a payload file would collide with the agent's files inside a slot."""
    clash = sorted(set(manifest.files) & RESERVED)
    if clash:
        raise ReservedNameError(f"package lists {', '.join(clash)}, which the agent reserves inside a slot; "
                                "rename the file in the package")


@dataclass(frozen=True)
class GoldenVerdict:
    ok: bool
    rows: int
    max_abs_diff: float
    tolerance: float
    argmax_mismatches: int

    def describe(self) -> str:
        return (f"max |Δ| {self.max_abs_diff:.3g} vs tolerance {self.tolerance:.3g}, argmax differs on "
                f"{self.argmax_mismatches} of {self.rows} rows")


def compare_golden(expected: np.ndarray, actual: np.ndarray, tolerance: float) -> GoldenVerdict:
    """Golden probabilities reproduced within ``tolerance`` (absolute) and with the same argmax per row?"""
    e, a = np.asarray(expected, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 2:
        return GoldenVerdict(False, int(e.shape[0]) if e.ndim else 0, float("inf"), tolerance, -1)
    diff = float(np.max(np.abs(e - a))) if e.size else 0.0
    if not np.isfinite(a).all():
        diff = float("inf")
    mism = int(np.sum(np.argmax(e, axis=1) != np.argmax(a, axis=1)))
    return GoldenVerdict(diff <= tolerance and mism == 0, int(e.shape[0]), diff, tolerance, mism)


# ---- the smoke test (runs the model; no state) --------------------------------------------------------
def smoke_test(folder: Path, manifest: Manifest, target: Target) -> dict[str, Any]:
    """Run the golden inputs of the unpacked package in ``folder``; return the numbers. Raises SmokeTestError."""
    from .imaging import preprocess
    from .runtime import open_runtime

    try:
        with np.load(folder / "golden.npz", allow_pickle=False) as z:
            x = np.asarray(z["x"], dtype=np.float32)
            expected = np.asarray(z["probabilities"], dtype=np.float32)
            tolerance = float(z["tolerance"])
    except (OSError, KeyError, ValueError) as exc:
        raise SmokeTestError(f"golden.npz cannot be read: {exc}") from None
    details: dict[str, Any] = {"rows": int(x.shape[0]), "tolerance": tolerance}
    spec = manifest.input.image
    if spec is not None:
        worst = 0.0
        for i in range(x.shape[0]):
            path = folder / "golden" / f"{i}.img"
            try:
                row, _ = preprocess(path.read_bytes(), spec)
            except (OSError, AgentError) as exc:
                raise SmokeTestError(f"golden image {i} cannot be preprocessed: {exc}", details) from None
            d = float(np.max(np.abs(row - x[i]))) if row.shape == x[i].shape else float("inf")
            worst = max(worst, d)
            if d > IMAGE_ATOL:
                details.update(image=i, image_max_abs_diff=d, image_atol=IMAGE_ATOL)
                raise SmokeTestError(
                    f"golden image {i} preprocesses to a row that differs from golden x[{i}] by max |Δ| {d:.3g} "
                    f"(allowed {IMAGE_ATOL}): this device decodes or resizes images differently", details)
        details["images_max_abs_diff"] = worst
    try:
        rt = open_runtime(manifest.runtime, folder / manifest.model_file, manifest.output.probabilities,
                          threads=target.threads, graph_optimization=target.graph_optimization)
        got = rt.run(x)
    except AgentError as exc:
        raise SmokeTestError(f"the model does not run here: {exc}", details) from None
    verdict = compare_golden(expected, got, tolerance)
    details.update(max_abs_diff=verdict.max_abs_diff, argmax_mismatches=verdict.argmax_mismatches)
    if not verdict.ok:
        raise SmokeTestError(f"golden outputs not reproduced: {verdict.describe()}", details)
    return details


def files_intact(folder: Path, manifest: Manifest) -> str | None:
    """None when every payload file in ``folder`` matches the manifest; else what differs."""
    for name, entry in sorted(manifest.files.items()):
        h = hashlib.sha256()
        try:
            with open(folder / name, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 20), b""):  # noqa: B023 - fh is bound per iteration
                    h.update(chunk)
        except OSError as exc:
            return f"{name}: {exc.strerror or exc}"
        if h.hexdigest() != entry.sha256:
            return f"{name} changed on disk (sha256 {h.hexdigest()[:12]}…, manifest {entry.sha256[:12]}…)"
    return None


def load_device_target(path: Path) -> Target:
    """The device's copy of its target profile (``target.toml``; its name is inside, not in the file name).

    Raises SchemaError when it is missing or invalid.
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SchemaError(f"cannot read the device's target profile {path}: {exc}; re-provision the device") from None
    return Target.from_dict(data, str(path))


# ---- results and the persisted record -----------------------------------------------------------------
@dataclass(frozen=True)
class InstallResult:
    """The outcome of one install or rollback; stored as ``last_result`` in update.json."""

    status: str  # "installed" | "rejected" | "failed" | "rolled_back"
    reason: str  # machine-readable token: "installed", "not_newer", "bad_signature", "smoke_test_failed", …
    message: str
    at: str
    name: str | None = None
    version: str | None = None
    slot: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    package: str | None = None  # the package file installed from (name/version are None when it never verified)

    @property
    def ok(self) -> bool:
        return self.status in ("installed", "rolled_back")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class UpdateRecord:
    """update.json: the state the updater is in, why, what it is working on, and the last result."""

    state: UpdateState = UpdateState.IDLE
    entered: str = ""
    reason: str = "never updated"
    package: str | None = None
    candidate: dict[str, Any] | None = None
    last_result: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> str:
        d = asdict(self)
        d["state"] = str(self.state)
        return json.dumps(d, indent=1, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: Path) -> UpdateRecord:
        """The record on disk (a fresh one when absent). Raises UpdateError when it is unreadable."""
        try:
            d = json.loads(path.read_bytes())
            rec = cls(
                state=UpdateState(d["state"]), entered=str(d.get("entered", "")), reason=str(d.get("reason", "")),
                package=d.get("package"), candidate=d.get("candidate"), last_result=d.get("last_result"),
                history=list(d.get("history", []))[-HISTORY_LENGTH:],
            )
        except FileNotFoundError:
            return cls()
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise UpdateError(f"{path} is unreadable ({exc!r})") from None
        return rec


# ---- the shell: files, locks, clocks ------------------------------------------------------------------
class Updater:
    """Installs, rolls back and recovers the model slots of one device folder."""

    def __init__(self, device: DeviceDir, *, clock: Callable[[], datetime] = utcnow) -> None:
        """Raises ConfigError, TrustStoreError or a ContractError (bad target.toml) for an unusable folder."""
        self.device = device
        self.clock = clock
        self.config = device.load_config()
        self.target = load_device_target(device.target_file)
        if self.target.name != self.config.target:
            raise ConfigError(f"{device.target_file} is for {self.target.name!r} but config.toml says "
                              f"{self.config.target!r}; re-provision the device")
        self.trust = TrustStore(device, clock=clock)
        self.slots = Slots(device)

    # ---- record and transitions -----------------------------------------------------------------------
    def record(self) -> UpdateRecord:
        return UpdateRecord.load(self.device.update_file)

    def _now(self) -> str:
        return fmt(self.clock())

    def _enter(self, rec: UpdateRecord, state: UpdateState, reason: str, **changes: Any) -> None:
        """Persist entry to ``state`` (atomically), log it with its reason, then honour the failpoint."""
        check_transition(rec.state, state)
        at = self._now()
        rec.history = [*rec.history, {"from": str(rec.state), "to": str(state), "reason": reason, "at": at}]
        rec.history = rec.history[-HISTORY_LENGTH:]
        log.info("update: %s -> %s (%s)", rec.state, state, reason)
        rec.state, rec.entered, rec.reason = state, at, reason
        for k, v in changes.items():
            setattr(rec, k, v)
        atomic_write_text(self.device.update_file, rec.to_json())
        _failpoint(state)

    def _save_idle(self, rec: UpdateRecord, result: InstallResult, note: str) -> None:
        """Record a result without a transition (an operation refused while idle, or recovery)."""
        at = self._now()
        rec.history = [*rec.history, {"from": str(rec.state), "to": "idle", "reason": note, "at": at}]
        rec.history = rec.history[-HISTORY_LENGTH:]
        log.warning("update: %s -> idle (%s)", rec.state, note)
        rec.state, rec.entered, rec.reason = UpdateState.IDLE, at, note
        rec.package, rec.candidate, rec.last_result = None, None, result.to_dict()
        atomic_write_text(self.device.update_file, rec.to_json())

    def _result(self, status: str, reason: str, message: str, m: Manifest | None = None, slot: str | None = None,
                details: dict[str, Any] | None = None, package: Path | None = None) -> InstallResult:
        return InstallResult(status, reason, message, self._now(), m.name if m else None, m.version if m else None,
                             slot, details or {}, str(package) if package else None)

    # ---- install --------------------------------------------------------------------------------------
    def install(self, pkg: Path) -> InstallResult:
        """Verify, stage, smoke-test and activate the package at ``pkg`` (already downloaded).

        Returns the result (also stored as ``last_result``): ``installed``, ``rejected`` (the package's fault:
        a contract check or ``not_newer``) or ``failed`` (smoke test, I/O). Raises BusyError when another
        process is updating, and the device-folder errors of ``Updater()``.
        """
        pkg = Path(pkg).absolute()
        with self.slots.lock():
            self._recover_locked()
            rec = self.record()
            active = self.slots.active()
            slot = self.slots.inactive_name()
            tmp = self.slots.tmp_path(slot)
            m: Manifest | None = None
            try:
                self._enter(rec, S.VERIFYING, f"install {pkg} requested", package=str(pkg), candidate=None)
                vp = self.trust.verify_package(pkg, None, self.target.name)
                m = vp.manifest
                check_newer(m, active[1] if active else None)
                check_reserved(m)
                self._enter(rec, S.STAGING, f"verified {m.name} {m.version} (signed by {short(vp.signer)}, keyset "
                            f"v{vp.keyset.version}); unpacking into slot {slot}",
                            candidate={"name": m.name, "version": m.version, "slot": slot})
                self.slots.discard(tmp)
                tmp.mkdir(parents=True)
                staged = self.trust.verify_package(pkg, tmp, self.target.name)
                if staged.manifest != m:
                    raise TrustStoreError("the package file changed while it was being installed; install it again")
                self.slots.write_manifest(tmp, m)
                self.slots.mark_complete(tmp, self.clock())
                self._enter(rec, S.SMOKE_TEST, f"unpacked {len(m.files)} files into {tmp.name}, fsynced, "
                            ".complete written")
                numbers = smoke_test(tmp, m, self.target)
                self.slots.mark_smoke_passed(tmp, numbers)
                self._enter(rec, S.ACTIVATING, f"smoke test passed on {numbers['rows']} golden rows "
                            f"(max |Δ| {numbers['max_abs_diff']:.3g} <= {numbers['tolerance']:.3g})")
                self.slots.promote(tmp, slot)
                self.slots.set_pointer(slot, m, self.clock())
                was = f"; standby {active[1].name} {active[1].version} in slot {other(slot)}" if active else ""
                result = self._result("installed", "installed", f"{m.name} {m.version} active in slot {slot}{was}",
                                      m, slot, numbers, pkg)
            except ContractError as exc:
                result = self._result("rejected", exc.reason, str(exc), m, package=pkg)
            except (NotNewerError, ReservedNameError) as exc:
                result = self._result("rejected", exc.reason, str(exc), m, package=pkg)
            except SmokeTestError as exc:
                result = self._result("failed", exc.reason, str(exc), m, details=exc.details, package=pkg)
            except (AgentError, OSError) as exc:
                result = self._result("failed", getattr(exc, "reason", "io_error"), str(exc), m, package=pkg)
            if not result.ok:
                self.slots.discard(tmp)
            self._enter(rec, S.IDLE, f"{result.status} ({result.reason})", package=None, candidate=None,
                        last_result=result.to_dict())
            return result

    # ---- rollback -------------------------------------------------------------------------------------
    def rollback(self, reason: str = "operator_request") -> InstallResult:
        """Point at the standby slot (ready, unexpired, files intact) without any download.

        ``reason`` is a short token saying why (``operator_request``; the rollout path passes its own).
        Returns ``rolled_back`` or ``failed`` (``no_standby``, ``expired``, ``file_mismatch``); raises BusyError.
        """
        with self.slots.lock():
            self._recover_locked()
            rec = self.record()
            active, standby = self.slots.active(), self.slots.standby()
            if standby is None:
                what = f"slot {other(self.slots.active_name() or 'b')}"
                err = NoStandbyError(f"no model to roll back to: {what} holds no complete, smoke-tested model")
                result = self._result("failed", err.reason, str(err))
                self._save_idle(rec, result, f"rollback refused ({err.reason})")
                return result
            folder, m = standby
            slot = folder.name
            problem: tuple[str, str] | None = None
            if m.expires <= self.trust.now():
                problem = ("expired", f"the standby {m.name} {m.version} expired at {fmt(m.expires)}")
            elif (bad := files_intact(folder, m)) is not None:
                problem = ("file_mismatch", f"the standby {m.name} {m.version} is damaged: {bad}")
            if problem is not None:
                result = self._result("failed", problem[0], problem[1] + "; install a package instead", m, slot)
                self._save_idle(rec, result, f"rollback refused ({problem[0]})")
                return result
            old = f"{active[1].name} {active[1].version}" if active else "no model"
            self._enter(rec, S.ROLLING_BACK, f"{reason}: switching from {old} to {m.name} {m.version} in slot {slot}",
                        candidate={"name": m.name, "version": m.version, "slot": slot})
            self.slots.set_pointer(slot, m, self.clock())
            result = self._result("rolled_back", reason, f"rolled back from {old} to {m.name} {m.version} "
                                  f"(slot {slot})", m, slot)
            self._enter(rec, S.IDLE, f"rolled_back ({reason})", package=None, candidate=None,
                        last_result=result.to_dict())
            return result

    # ---- recovery -------------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Start-up repair (see the module docstring); returns what it did. A no-op while another process
        holds the update lock (that process owns the slots)."""
        try:
            with self.slots.lock():
                return self._recover_locked()
        except BusyError:
            return []

    def _recover_locked(self) -> list[str]:
        actions: list[str] = []
        for p in self.slots.leftovers():
            if p.is_dir():
                self.slots.discard(p)
            else:
                p.unlink()
            actions.append(f"discarded leftover {p.name}")
        for s in SLOT_NAMES:
            folder = self.slots.path(s)
            if folder.exists() and not self.slots.is_ready(s):
                self.slots.discard(folder)
                actions.append(f"discarded incomplete slot {s}")
        actions += self._repair_pointer()
        try:
            rec = self.record()
            interrupted = None if rec.state == UpdateState.IDLE else str(rec.state)
        except UpdateError as exc:
            rec, interrupted = UpdateRecord(), f"an unknown state ({exc})"
        if interrupted is not None:
            serving = self.slots.active()
            now = f"; serving {serving[1].name} {serving[1].version}" if serving else "; no model active"
            cand = rec.candidate or {}
            result = InstallResult("failed", "interrupted", f"interrupted during {interrupted}{now}", self._now(),
                                   cand.get("name"), cand.get("version"), cand.get("slot"))
            self._save_idle(rec, result, f"recovered: interrupted during {interrupted}")
            actions.append(f"recorded the operation interrupted during {interrupted} as failed")
        for a in actions:
            log.warning("recover: %s", a)
        return actions

    def _repair_pointer(self) -> list[str]:
        try:
            p = self.slots.pointer()
        except SlotError as exc:
            p, broken = None, str(exc)
        else:
            if p is None:
                return []
            broken = f"active.json names slot {p.slot} ({p.name} {p.version}), which is not a ready slot"
        if p is not None and self.slots.active_name() == p.slot:
            return []
        fallback = [s for s in SLOT_NAMES if (p is None or s != p.slot) and self.slots.is_ready(s)]
        if fallback:
            m = self.slots.manifest(fallback[0])
            assert m is not None
            self.slots.set_pointer(fallback[0], m, self.clock())
            return [f"{broken}; fell back to slot {fallback[0]} ({m.name} {m.version})"]
        self.slots.clear_pointer()
        return [f"{broken}; no ready slot left, so no model is active"]


def _failpoint(state: UpdateState) -> None:
    """Test hook: SIGKILL this process right after entering ``state`` when EDGEFLEET_FAILPOINT names it."""
    if os.environ.get(FAILPOINT_ENV) == str(state):
        os.kill(os.getpid(), signal.SIGKILL)
