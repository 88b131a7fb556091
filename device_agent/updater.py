"""Installing a model package into the A/B slots: an explicit state machine persisted on entry to each state.

States and transitions (``TRANSITIONS`` is the single source; ``Updater._enter`` refuses anything else)::

    idle ──deploy──▶ downloading ─▶ verifying                       (the rollout path joins the install path)
    idle ──install─▶ verifying ─▶ staging ─▶ smoke_test ─▶ activating ─▶ idle                       (installed)
                                                          activating ─▶ probation ─▶ idle           (committed)
                                                                        probation ─▶ rolling_back ─▶ idle
                                                                                     (rolled_back | rollback_failed)
    downloading | verifying | staging | smoke_test ─▶ idle                        (rejected | failed | deferred)
    idle ──rollback─▶ rolling_back ─▶ idle     (rolled_back; no usable standby: refused before entering, failed)

* **downloading** (``deploy``): the caller's ``fetch`` brings the package file (``device_agent.download``: HTTP
  Range resume, never past the declared length, sha256 checked against the desired state). A failure goes back
  to idle with the download's reason (``hash_mismatch``, ``length_exceeded``, ``download_interrupted``, …).
* **verifying**: the whole package is verified (signatures chain to the pinned root, nothing expired by
  ``max(wall clock, high-water)``, target, every file's hash and length) without writing a byte; then the
  version must be newer than the active one of the same model name. A rejection here leaves both slots
  untouched, so the standby (previous version) survives a bad package.
* **staging**: the package is verified again while it is unpacked into ``slots/<inactive>.tmp`` (a second
  pass closes the gap between checking and extracting); the tree is fsynced and ``.complete`` written last.
* **smoke_test**: the staged model is loaded with the target's threads, the golden inputs are run and
  compared with the golden probabilities (tolerance from the package, same argmax); image packages first
  check that each golden image preprocesses to its golden row. Failure discards the staged folder; the active
  slot and the standby are untouched. Then the caller's ``before_activate`` hook runs (rollouts: wait for the
  maintenance window and for no running batch, measure the previous version's p95); it may defer the swap
  (``DeferredError`` -> ``deferred``, the staged folder is discarded, the caller retries later).
* **activating**: the staged folder replaces the inactive slot (the old standby) and ``active.json`` is
  replaced atomically to name it. The previous version stays in the other slot as the new standby.
* **probation** (only when the caller asks for it): the new version serves while a watcher
  (``device_agent.probation``) judges it; ``finish_probation`` commits (``committed``) or rolls back.
* **rolling_back**: ``active.json`` is switched to the standby slot (ready, unexpired, files intact); no
  download. Asked for while idle, a missing or damaged standby is refused before anything changes
  (``failed``); from probation the state is entered first, and a rollback that cannot be done is reported as
  ``rollback_failed`` (the new version keeps serving), distinct from every other status.

``update.json`` holds the current state, why it was entered, the candidate, ``last_result`` and a short
history; every transition is also logged (logger ``device_agent.updater``) and passed to the optional
``on_transition`` hook (the runner queues a report). ``Updater.recover()`` runs at every start-up: it discards
staging/trash folders and incomplete slots, makes sure the pointer names a ready slot (else the other ready
slot, else no model), and then, by the state it finds:

* ``probation`` with the candidate still active: left as it is. The watch is resumed by the desired-state
  handler of the running agent (``device_agent.desired_handler``), which counts the restarts and rolls back
  when the agent keeps dying during probation. ``recover`` never starts network work or a watch itself.
* ``rolling_back`` that came from probation: the rollback is completed (an atomic pointer write to the slot it
  named, if still ready) or reported as ``rollback_failed``: a version that failed probation must not keep
  serving because the agent was killed mid-rollback.
* any other non-idle state (``downloading`` included): recorded as ``failed`` (``interrupted during
  <state>``). A partial download stays in ``downloads/`` so the handler resumes it with a Range request when
  the desired state still asks for it; an interrupted install is redone from the complete file.

Decisions:
* A package for a *different model name* than the active one is accepted (a device runs one model; switching
  it is an operator decision expressed by publishing a signed package for the device's target). Only the same
  name must move forward in version; going back is ``rollback`` to a version the device already holds.
* A newer keyset carried by a package is persisted as soon as the package verified, even if the smoke test
  later fails: it is root-signed trust metadata, independent of whether the model works here.
* A failed rollback (no ready standby) is recorded in ``last_result`` too: it is the latest update operation.
* ``install`` is refused while a version is on probation (``InProbationError``); ``rollback`` is allowed (an
  operator ending the probation by hand).

Test hook (failpoint): when the environment variable ``EDGEFLEET_FAILPOINT`` equals the name of a state, the
process SIGKILLs itself right after persisting entry to that state. The crash tests use it to prove that a
kill at any point leaves a device that serves exactly the old or the new model. Never set it in production.
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
    "DeferredError",
    "GoldenVerdict",
    "IllegalTransitionError",
    "InProbationError",
    "InstallResult",
    "NoStandbyError",
    "NotNewerError",
    "ReservedNameError",
    "SmokeTestError",
    "UpdateError",
    "UpdateState",
    "Updater",
    "WrongPackageError",
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


class WrongPackageError(UpdateError):
    """The downloaded package holds another model name or version than the desired state asked for."""

    reason = "wrong_package"


class InProbationError(UpdateError):
    """An install was asked for while the active version is still on probation."""

    reason = "in_probation"


class DeferredError(UpdateError):
    """``before_activate`` postponed the swap (maintenance window closed, a batch running); try again later.

    ``reason`` is the token of the cause (``maintenance_window``, ``busy``)."""

    reason = "deferred"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ---- the state machine (pure) -------------------------------------------------------------------------
class UpdateState(StrEnum):
    IDLE = "idle"
    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    STAGING = "staging"
    SMOKE_TEST = "smoke_test"
    ACTIVATING = "activating"
    PROBATION = "probation"
    ROLLING_BACK = "rolling_back"


S = UpdateState
TRANSITIONS: dict[UpdateState, frozenset[UpdateState]] = {
    S.IDLE: frozenset({S.DOWNLOADING, S.VERIFYING, S.ROLLING_BACK}),
    S.DOWNLOADING: frozenset({S.VERIFYING, S.IDLE}),
    S.VERIFYING: frozenset({S.STAGING, S.IDLE}),
    S.STAGING: frozenset({S.SMOKE_TEST, S.IDLE}),
    S.SMOKE_TEST: frozenset({S.ACTIVATING, S.IDLE}),
    S.ACTIVATING: frozenset({S.PROBATION, S.IDLE}),
    S.PROBATION: frozenset({S.IDLE, S.ROLLING_BACK}),
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
OK_STATUSES = frozenset({"installed", "probation", "committed", "rolled_back"})


@dataclass(frozen=True)
class InstallResult:
    """The outcome of one install or rollback; stored as ``last_result`` in update.json."""

    # "installed" | "probation" (activated, being watched) | "committed" | "rejected" | "failed" | "deferred"
    # | "rolled_back" | "rollback_failed"
    # name/version/slot: what the operation installed, or for a rollback what the device switched to; a rollback's
    # details["from"] = {"name", "version"} names the version rolled back (rollback_failed: still serving it).
    status: str
    reason: str  # machine-readable token: "installed", "not_newer", "bad_signature", "probation_latency", …
    message: str
    at: str
    name: str | None = None
    version: str | None = None
    slot: str | None = None
    details: dict[str, Any] = field(default_factory=dict)
    package: str | None = None  # the package file installed from (name/version are None when it never verified)

    @property
    def ok(self) -> bool:
        return self.status in OK_STATUSES

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

    def __init__(self, device: DeviceDir, *, clock: Callable[[], datetime] = utcnow,
                 on_transition: Callable[[UpdateRecord], None] | None = None) -> None:
        """Raises ConfigError, TrustStoreError or a ContractError (bad target.toml) for an unusable folder.

        ``on_transition`` is called (exceptions logged, never raised) after every persisted state change."""
        self.device = device
        self.clock = clock
        self.on_transition = on_transition
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

    def _persist(self, rec: UpdateRecord) -> None:
        atomic_write_text(self.device.update_file, rec.to_json())

    def _notify(self, rec: UpdateRecord) -> None:
        if self.on_transition is None:
            return
        try:
            self.on_transition(rec)
        except Exception:  # noqa: BLE001 - a report hook must never break an update
            log.exception("on_transition hook failed")

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
        self._persist(rec)
        _failpoint(state)
        self._notify(rec)

    def _save_idle(self, rec: UpdateRecord, result: InstallResult, note: str) -> None:
        """Record a result without a transition (an operation refused while idle, or recovery)."""
        at = self._now()
        rec.history = [*rec.history, {"from": str(rec.state), "to": "idle", "reason": note, "at": at}]
        rec.history = rec.history[-HISTORY_LENGTH:]
        log.warning("update: %s -> idle (%s)", rec.state, note)
        rec.state, rec.entered, rec.reason = UpdateState.IDLE, at, note
        rec.package, rec.candidate, rec.last_result = None, None, result.to_dict()
        self._persist(rec)
        self._notify(rec)

    def _result(self, status: str, reason: str, message: str, m: Manifest | None = None, slot: str | None = None,
                details: dict[str, Any] | None = None, package: Path | None = None) -> InstallResult:
        return InstallResult(status, reason, message, self._now(), m.name if m else None, m.version if m else None,
                             slot, details or {}, str(package) if package else None)

    @staticmethod
    def _refuse_in_probation(rec: UpdateRecord) -> None:
        if rec.state == S.PROBATION:
            c = rec.candidate or {}
            raise InProbationError(f"{c.get('name')} {c.get('version')} is on probation since {rec.entered}; wait "
                                   "until it is committed or rolled back, or roll back now (`device-agent rollback`)")

    # ---- install --------------------------------------------------------------------------------------
    def install(self, pkg: Path, *, probation: dict[str, Any] | None = None,
                before_activate: Callable[[], dict[str, Any]] | None = None) -> InstallResult:
        """Verify, stage, smoke-test and activate the package at ``pkg`` (already downloaded).

        Returns the result (also stored as ``last_result``): ``installed``, ``rejected`` (the package's fault:
        a contract check or ``not_newer``), ``failed`` (smoke test, I/O) or ``deferred`` (``before_activate``
        postponed the swap). With ``probation`` (a dict persisted with the candidate: the watch's parameters)
        the new version is left on probation and the result is ``probation`` (not stored as ``last_result``:
        ``finish_probation`` writes the outcome). ``before_activate`` runs after the smoke test, just before
        the swap; what it returns is stored in the candidate's probation record (e.g. the previous version's
        p95). Raises BusyError when another process is updating, InProbationError while a version is on
        probation, and the device-folder errors of ``Updater()``.
        """
        pkg = Path(pkg).absolute()
        with self.slots.lock():
            self._recover_locked()
            rec = self.record()
            self._refuse_in_probation(rec)
            self._enter(rec, S.VERIFYING, f"install {pkg} requested", package=str(pkg), candidate=None)
            return self._install_locked(rec, pkg, probation, before_activate, {})

    def deploy(self, fetch: Callable[[], Path], want: dict[str, Any], *, probation: dict[str, Any] | None = None,
               before_activate: Callable[[], dict[str, Any]] | None = None) -> InstallResult:
        """The rollout path: ``idle -> downloading -> verifying -> …``. ``fetch()`` returns the downloaded,
        hash-checked package file (it raises AgentError/OSError subclasses whose ``reason`` is recorded).

        ``want`` describes the target (``name``, ``version``, ``url``, ``sha256``, ``length``, ``seq``); it is
        persisted as the candidate while downloading and kept with it afterwards. Otherwise as ``install``.
        """
        with self.slots.lock():
            self._recover_locked()
            rec = self.record()
            self._refuse_in_probation(rec)
            what = f"{want.get('name')} {want.get('version')}"
            self._enter(rec, S.DOWNLOADING, f"download {what} from {want.get('url')} (desired seq "
                        f"{want.get('seq')})", package=None, candidate=dict(want))
            try:
                pkg = Path(fetch()).absolute()
            except (AgentError, OSError) as exc:
                result = InstallResult("failed", getattr(exc, "reason", "io_error"), str(exc), self._now(),
                                       want.get("name"), want.get("version"))
                self._enter(rec, S.IDLE, f"failed ({result.reason})", package=None, candidate=None,
                            last_result=result.to_dict())
                return result
            self._enter(rec, S.VERIFYING, f"downloaded {pkg.name} ({pkg.stat().st_size} bytes, sha256 as desired)",
                        package=str(pkg))
            return self._install_locked(rec, pkg, probation, before_activate, want)

    def _install_locked(self, rec: UpdateRecord, pkg: Path, probation: dict[str, Any] | None,
                        before_activate: Callable[[], dict[str, Any]] | None, want: dict[str, Any]) -> InstallResult:
        """From ``verifying`` (already entered) to ``idle`` or ``probation``; the caller holds the lock."""
        active = self.slots.active()
        slot = self.slots.inactive_name()
        tmp = self.slots.tmp_path(slot)
        m: Manifest | None = None
        try:
            vp = self.trust.verify_package(pkg, None, self.target.name)
            m = vp.manifest
            if want and (m.name, m.version) != (want.get("name"), want.get("version")):
                raise WrongPackageError(f"the package holds {m.name} {m.version}, but {want.get('name')} "
                                        f"{want.get('version')} was asked for; fix the desired state")
            check_newer(m, active[1] if active else None)
            check_reserved(m)
            self._enter(rec, S.STAGING, f"verified {m.name} {m.version} (signed by {short(vp.signer)}, keyset "
                        f"v{vp.keyset.version}); unpacking into slot {slot}",
                        candidate={**want, "name": m.name, "version": m.version, "slot": slot})
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
            extra = before_activate() if before_activate is not None else {}
            self._enter(rec, S.ACTIVATING, f"smoke test passed on {numbers['rows']} golden rows "
                        f"(max |Δ| {numbers['max_abs_diff']:.3g} <= {numbers['tolerance']:.3g})")
            self.slots.promote(tmp, slot)
            self.slots.set_pointer(slot, m, self.clock())
            was = f"; standby {active[1].name} {active[1].version} in slot {other(slot)}" if active else ""
            if probation is not None:
                previous = None if active is None else {"name": active[1].name, "version": active[1].version,
                                                        "slot": active[0].name}
                cand = {**want, "name": m.name, "version": m.version, "slot": slot, "previous": previous,
                        "probation": {**probation, **extra, "started": self._now(), "resumes": 0}}
                self._enter(rec, S.PROBATION, f"{m.name} {m.version} active in slot {slot}{was}; on probation",
                            candidate=cand, package=None)
                return self._result("probation", "probation", f"{m.name} {m.version} active in slot {slot} on "
                                    f"probation{was}", m, slot, numbers, pkg)
            result = self._result("installed", "installed", f"{m.name} {m.version} active in slot {slot}{was}",
                                  m, slot, numbers, pkg)
        except ContractError as exc:
            result = self._result("rejected", exc.reason, str(exc), m, package=pkg)
        except (NotNewerError, ReservedNameError) as exc:
            result = self._result("rejected", exc.reason, str(exc), m, package=pkg)
        except SmokeTestError as exc:
            result = self._result("failed", exc.reason, str(exc), m, details=exc.details, package=pkg)
        except DeferredError as exc:
            result = self._result("deferred", exc.reason, str(exc), m, package=pkg)
        except (AgentError, OSError) as exc:
            result = self._result("failed", getattr(exc, "reason", "io_error"), str(exc), m, package=pkg)
        if not result.ok:
            self.slots.discard(tmp)
        self._enter(rec, S.IDLE, f"{result.status} ({result.reason})", package=None, candidate=None,
                    last_result=result.to_dict())
        return result

    # ---- probation ------------------------------------------------------------------------------------
    def note_probation_resume(self) -> dict[str, Any] | None:
        """Count one more (re)start of the probation watch; the candidate as persisted, or None when no
        version is on probation. Raises BusyError."""
        with self.slots.lock():
            rec = self.record()
            if rec.state != S.PROBATION or not rec.candidate:
                return None
            cand = dict(rec.candidate)
            prob = dict(cand.get("probation") or {})
            prob["resumes"] = int(prob.get("resumes", 0)) + 1
            cand["probation"] = prob
            rec.candidate = cand
            self._persist(rec)
            return cand

    def finish_probation(self, passed: bool, reason: str, message: str, details: dict[str, Any] | None = None, *,
                         expect: tuple[str, str] | None = None) -> InstallResult | None:
        """End the probation: ``committed`` when ``passed``, else roll back to the standby (``rolled_back`` or
        ``rollback_failed``). ``reason`` is the token, ``message`` the sentence (``probation: …``).

        Returns None when no version is on probation any more (or not the ``expect``-ed (name, version)):
        someone else ended it. Raises BusyError when another process holds the update lock.
        """
        with self.slots.lock():
            rec = self.record()
            cand = rec.candidate or {}
            if rec.state != S.PROBATION or (expect is not None and (cand.get("name"), cand.get("version")) != expect):
                return None
            if not passed:
                return self._rollback_locked(rec, reason, message, details or {})
            active = self.slots.active()
            m = active[1] if active else None
            result = self._result("committed", reason, message, m, active[0].name if active else None, details)
            self._enter(rec, S.IDLE, f"committed ({reason})", package=None, candidate=None,
                        last_result=result.to_dict())
            return result

    # ---- rollback -------------------------------------------------------------------------------------
    def rollback(self, reason: str = "operator_request", *, message: str = "",
                 details: dict[str, Any] | None = None) -> InstallResult:
        """Point at the standby slot (ready, unexpired, files intact) without any download.

        ``reason`` is a short token saying why (``operator_request``; the rollout path passes its own) and
        ``message`` an optional sentence put in front of the result's message. Returns ``rolled_back`` or
        ``failed`` (``no_standby``, ``expired``, ``file_mismatch``) when idle; from probation a rollback that
        cannot be done is ``rollback_failed``. Raises BusyError.
        """
        with self.slots.lock():
            self._recover_locked()
            return self._rollback_locked(self.record(), reason, message, details or {})

    def _standby_problem(self, standby: tuple[Path, Manifest] | None) -> tuple[str, str] | None:
        if standby is None:
            what = f"slot {other(self.slots.active_name() or 'b')}"
            err = NoStandbyError(f"no model to roll back to: {what} holds no complete, smoke-tested model")
            return err.reason, str(err)
        folder, m = standby
        if m.expires <= self.trust.now():
            return "expired", f"the standby {m.name} {m.version} expired at {fmt(m.expires)}"
        if (bad := files_intact(folder, m)) is not None:
            return "file_mismatch", f"the standby {m.name} {m.version} is damaged: {bad}"
        return None

    def _rollback_locked(self, rec: UpdateRecord, reason: str, why: str, details: dict[str, Any]) -> InstallResult:
        from_probation = rec.state == S.PROBATION
        active, standby = self.slots.active(), self.slots.standby()
        problem = self._standby_problem(standby)
        old = f"{active[1].name} {active[1].version}" if active else "no model"
        if problem is not None and not from_probation:
            result = self._result("failed", problem[0], problem[1] + ("; install a package instead"
                                  if standby is not None else ""), standby[1] if standby else None,
                                  standby[0].name if standby else None)
            self._save_idle(rec, result, f"rollback refused ({problem[0]})")
            return result
        target = None if standby is None else {"name": standby[1].name, "version": standby[1].version,
                                                "slot": standby[0].name}
        # what is rolled back (the failed version), for the server's gates: the result's own name/version say
        # what the device switched to
        details = {**details, "from": None if active is None else {"name": active[1].name,
                                                                   "version": active[1].version}}
        to = f"{target['name']} {target['version']} in slot {target['slot']}" if target else "no standby"
        cand = {**(target or {}), "rollback": {"reason": reason, "message": why, "details": details,
                                               "from_probation": from_probation, "from": old}}
        self._enter(rec, S.ROLLING_BACK, f"{reason}: switching from {old} to {to}", candidate=cand)
        prefix = f"{why}; " if why else ""
        if problem is None and standby is not None:
            try:
                self.slots.set_pointer(standby[0].name, standby[1], self.clock())
            except OSError as exc:
                problem = ("io_error", f"cannot write {self.device.active_file}: {exc}")
        if problem is not None:
            result = self._result("rollback_failed", problem[0], f"{prefix}the rollback failed: {problem[1]}; still "
                                  f"serving {old}", active[1] if active else None, active[0].name if active else None,
                                  {**details, "rollback_reason": reason})
            self._enter(rec, S.IDLE, f"rollback_failed ({problem[0]})", package=None, candidate=None,
                        last_result=result.to_dict())
            return result
        assert standby is not None
        folder, m = standby
        result = self._result("rolled_back", reason, f"{prefix}rolled back from {old} to {m.name} {m.version} "
                              f"(slot {folder.name})", m, folder.name, details)
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
        cand = rec.candidate or {}
        if rec.state == S.PROBATION and self._candidate_active(cand):
            interrupted = None  # the watch resumes in the running agent (desired_handler)
        elif rec.state == S.ROLLING_BACK and (cand.get("rollback") or {}).get("from_probation"):
            actions.append(self._finish_interrupted_rollback(rec, cand))
            interrupted = None
        if interrupted is not None:
            serving = self.slots.active()
            now = f"; serving {serving[1].name} {serving[1].version}" if serving else "; no model active"
            result = InstallResult("failed", "interrupted", f"interrupted during {interrupted}{now}", self._now(),
                                   cand.get("name"), cand.get("version"), cand.get("slot"))
            self._save_idle(rec, result, f"recovered: interrupted during {interrupted}")
            actions.append(f"recorded the operation interrupted during {interrupted} as failed")
        for a in actions:
            log.warning("recover: %s", a)
        return actions

    def _candidate_active(self, cand: dict[str, Any]) -> bool:
        active = self.slots.active()
        return active is not None and (active[0].name, active[1].name, active[1].version) == (
            cand.get("slot"), cand.get("name"), cand.get("version"))

    def _finish_interrupted_rollback(self, rec: UpdateRecord, cand: dict[str, Any]) -> str:
        """A rollback out of probation was killed midway: complete it (the pointer write is atomic)."""
        rb = cand.get("rollback") or {}
        reason, why = str(rb.get("reason", "probation_failed")), str(rb.get("message", ""))
        slot = str(cand.get("slot"))
        m = self.slots.manifest(slot) if slot in SLOT_NAMES and self.slots.is_ready(slot) else None
        prefix = f"{why}; " if why else ""
        if m is None or (m.name, m.version) != (cand.get("name"), cand.get("version")):
            result = InstallResult("rollback_failed", "no_standby", f"{prefix}the rollback was interrupted and slot "
                                   f"{slot} no longer holds {cand.get('name')} {cand.get('version')}", self._now(),
                                   details={"rollback_reason": reason})
            self._save_idle(rec, result, "recovered: rollback out of probation could not be completed")
            return "a rollback out of probation could not be completed"
        if self.slots.active_name() != slot:
            self.slots.set_pointer(slot, m, self.clock())
        result = InstallResult("rolled_back", reason, f"{prefix}rolled back from {rb.get('from')} to {m.name} "
                               f"{m.version} (slot {slot}; completed after a restart)", self._now(), m.name,
                               m.version, slot, dict(rb.get("details") or {}))  # details carry "from"
        self._save_idle(rec, result, "recovered: completed the rollback out of probation")
        return f"completed the rollback out of probation to {m.name} {m.version}"

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
