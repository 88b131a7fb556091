"""The updater's shell: files, the update lock and the clock around the state machine of :mod:`.states`.

:class:`Updater` installs (``install``: a package file already here; ``deploy``: the rollout path, download
first), ends a probation (``finish_probation``), rolls back and recovers (:mod:`.recovery`). Every state is
entered through ``Updater._enter``, which refuses a transition outside ``TRANSITIONS``, persists the record
atomically, logs the transition with its reason (logger ``device_agent.updater``), honours the failpoint and
then calls the optional ``on_transition`` hook (the runner queues a report).

Decisions:
* A newer keyset carried by a package is persisted as soon as the package verified, even if the smoke test
  later fails: it is root-signed trust metadata, independent of whether the model works here.
* A failed rollback (no ready standby) is recorded in ``last_result`` too: it is the latest update operation.
* ``install`` is refused while a version is on probation (``InProbationError``); ``rollback`` is allowed (an
  operator ending the probation by hand).
* ``rollback`` only goes back (``checks.goes_back``: an older version of the same model). After one, the standby
  slot holds the newer version; a second ``device-agent rollback`` is refused (``standby_not_older``) instead of
  switching forward to it and calling that a rollback. Moving forward to a version the device still holds is
  ``activate_standby``, which the desired-state handler uses when a rollout names that version: no download,
  ``idle -> activating -> probation``, reported as a switch to the standby slot and watched like any new version.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import Any

from edgefleet_contracts.atomic import atomic_write_text
from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.manifest import Manifest
from edgefleet_contracts.signing import short
from edgefleet_contracts.timeutil import fmt, utcnow

from ..config import ConfigError, DeviceDir
from ..errors import AgentError
from ..slots import BusyError, Slots, other
from ..trust_store import TrustStore, TrustStoreError
from .checks import check_newer, check_reserved, files_intact, goes_back, load_device_target
from .errors import (
    DeferredError,
    InProbationError,
    NoStandbyError,
    NotNewerError,
    ReservedNameError,
    SmokeTestError,
    StandbyNotOlderError,
    WrongPackageError,
)
from .recovery import recover_locked
from .smoke import smoke_test
from .states import HISTORY_LENGTH, InstallResult, UpdateRecord, UpdateState, check_transition, failpoint

log = logging.getLogger("device_agent.updater")  # one logger for the whole updater, as before the split
S = UpdateState


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
        failpoint(state)
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
            self.slots.write_manifest(tmp, m, staged.signer)
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
        except Exception as exc:  # a signed but malformed package (an IndexError deep in a check): a final failure,
            # never a state left half-way that the worker would retry for ever
            log.exception("installing %s failed unexpectedly", pkg.name)
            result = self._result("failed", "package_broken", f"the install failed unexpectedly: {exc!r}", m,
                                  package=pkg)
        if not result.ok:
            self.slots.discard(tmp)
        if result.name is None and want.get("name") and want.get("version"):
            # refused before its manifest was read (wrong target, bad signature, …): the result names the version
            # that was asked for, so the fleet server counts it against that rollout (it waited for ever before)
            result = replace(result, name=want["name"], version=want["version"])
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
        """Go back to the older model held in the standby slot (ready, unexpired, files intact), without any
        download.

        A rollback only goes back (``checks.goes_back``): to an older version of the same model, or to another
        model installed before the active one. When the standby holds a newer one (the active version was rolled
        back to already, so the standby is the version that was rolled back from) it is refused, ``failed``
        (``standby_not_older``), and nothing changes: switching forward to it is no rollback, and doing it
        quietly would put a version back into service that was taken out, without the probation a rollout gives
        it. To run it again, install its package or roll it out (``activate_standby``). From probation the
        standby is always the previous version and the rollback is never refused for its order.

        ``reason`` is a short token saying why (``operator_request``; the rollout path passes its own) and
        ``message`` an optional sentence put in front of the result's message. Returns ``rolled_back`` or
        ``failed`` (``no_standby``, ``expired``, ``file_mismatch``, ``standby_not_older``) when idle; from
        probation a rollback that cannot be done is ``rollback_failed``. Raises BusyError.
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

    def _signer_warning(self, slot: str, m: Manifest, done: str) -> tuple[str, dict[str, str]]:
        """When the model ``m`` in ``slot`` was signed by a key the device's keyset now revokes: the result
        message's ``"; warning: …"`` and its details' ``standby_signer_revoked``, logged as ``done`` (what the
        switch was); else ``("", {})``.

        Switching to it (a rollback, or a rollout back to the standby) is not refused: it passed every check,
        signature included, when it was installed, and a rollback is how a device gets back to a working model,
        from probation too, so refusing it could leave a failing model serving. The warning goes in the result
        (the report the server shows) and the log, and the details carry ``standby_signer_revoked``, so the
        operator replaces it with a package signed by a live key. Slots installed before the signer was recorded
        are not checked."""
        signer = self.slots.signer(slot)
        if signer is None:
            return "", {}
        try:
            keyset = self.trust.trusted_keyset()
        except TrustStoreError:
            return "", {}  # the trust store's own problem is reported where it is used
        if keyset is None or signer not in keyset.revoked:
            return "", {}
        warning = (f"it was signed by key {short(signer)}, which the device's keyset (version {keyset.version}) "
                   "now revokes; install a package signed by a live key")
        log.warning("%s %s %s in slot %s: %s", done, m.name, m.version, slot, warning)
        return f"; warning: {warning}", {"standby_signer_revoked": signer}

    def standby_is_older(self) -> bool | None:
        """Whether switching to the standby slot goes back (``checks.goes_back``); None without an active model
        or a ready standby."""
        active, standby = self.slots.active(), self.slots.standby()
        if active is None or standby is None:
            return None
        return goes_back(active[1], standby[1], self.slots.installed_at(active[0].name),
                         self.slots.installed_at(standby[0].name))

    def _not_older(self, active: tuple[Path, Manifest], standby: tuple[Path, Manifest]) -> StandbyNotOlderError:
        (slot, s), (_, a) = standby, active
        order = f"newer than the active {a.name} {a.version}" if s.name == a.name else (
            f"installed after the active {a.name} {a.version}")
        return StandbyNotOlderError(
            f"no rollback to do: the standby slot {slot.name} holds {s.name} {s.version}, {order}, and a rollback "
            f"only goes back. To run {s.name} {s.version} again, install its package (`device-agent install`) or "
            "roll it out from the fleet server; nothing was changed")

    def _rollback_locked(self, rec: UpdateRecord, reason: str, why: str, details: dict[str, Any]) -> InstallResult:
        from_probation = rec.state == S.PROBATION
        active, standby = self.slots.active(), self.slots.standby()
        problem = self._standby_problem(standby)
        if problem is None and not from_probation and self.standby_is_older() is False:
            assert active is not None and standby is not None
            err = self._not_older(active, standby)
            result = self._result("failed", err.reason, str(err))
            self._save_idle(rec, result, f"rollback refused ({err.reason})")
            return result
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
        note, revoked = self._signer_warning(folder.name, m, "rolled back to")
        result = self._result("rolled_back", reason, f"{prefix}rolled back from {old} to {m.name} {m.version} "
                              f"(slot {folder.name}){note}", m, folder.name, {**details, **revoked})
        self._enter(rec, S.IDLE, f"rolled_back ({reason})", package=None, candidate=None,
                    last_result=result.to_dict())
        return result

    # ---- forward to the standby ---------------------------------------------------------------------------
    def activate_standby(self, want: dict[str, Any], *, probation: dict[str, Any] | None = None,
                         before_activate: Callable[[], dict[str, Any]] | None = None) -> InstallResult:
        """The rollout path to a version the device still holds in its standby slot and that does not go back
        (``standby_is_older()`` is False: a version rolled out again after it was rolled back): no download, no
        unpacking and no smoke test (the slot passed them when it was installed, and ``_standby_problem`` checks
        it is unexpired and intact), ``idle -> activating -> probation`` as for a new version, or ``-> idle``
        without ``probation``.

        ``want`` describes the target as for ``deploy`` (``name``, ``version``, ``seq``, …) and is kept with the
        candidate. ``before_activate`` runs before the switch, as for ``install`` (it may defer it). Returns
        ``probation`` (the caller watches it and calls ``finish_probation``), ``switched`` (no probation asked
        for), ``deferred``, or ``failed`` when the standby is not ``want`` or not usable (``no_standby``,
        ``expired``, ``file_mismatch``) or the pointer cannot be written. Raises BusyError, InProbationError.
        """
        with self.slots.lock():
            self._recover_locked()
            rec = self.record()
            self._refuse_in_probation(rec)
            active, standby = self.slots.active(), self.slots.standby()
            what = f"{want.get('name')} {want.get('version')}"
            problem = self._standby_problem(standby)
            if problem is None and standby is not None and (
                    (standby[1].name, standby[1].version) != (want.get("name"), want.get("version"))):
                problem = ("no_standby", f"the standby slot {standby[0].name} holds {standby[1].name} "
                           f"{standby[1].version}, not {what}")
            if problem is not None or standby is None:
                reason, msg = problem or ("no_standby", "no standby")
                result = InstallResult("failed", reason, f"cannot switch to {what} in the standby slot: {msg}",
                                       self._now(), want.get("name"), want.get("version"))
                self._save_idle(rec, result, f"switch to the standby refused ({reason})")
                return result
            folder, m = standby
            slot = folder.name
            try:
                extra = before_activate() if before_activate is not None else {}
            except DeferredError as exc:
                result = self._result("deferred", exc.reason, str(exc), m, slot)
                self._save_idle(rec, result, f"switch to the standby deferred ({exc.reason})")
                return result
            was = f"{active[1].name} {active[1].version}" if active else "no model"
            cand = {**want, "name": m.name, "version": m.version, "slot": slot}
            self._enter(rec, S.ACTIVATING, f"{m.name} {m.version} is in the standby slot {slot} (installed and "
                        f"smoke-tested before): switching to it from {was}, no download", package=None,
                        candidate=cand)
            try:
                self.slots.set_pointer(slot, m, self.clock())
            except OSError as exc:
                result = self._result("failed", "io_error", f"cannot write {self.device.active_file}: {exc}; still "
                                      f"serving {was}", m, slot)
                self._enter(rec, S.IDLE, "failed (io_error)", candidate=None, last_result=result.to_dict())
                return result
            now = f"switched to the standby slot {slot}: {m.name} {m.version} active" + (
                f"; standby {was} in slot {other(slot)}" if active else "")
            details: dict[str, Any] = {"from": None if active is None else {"name": active[1].name,
                                                                            "version": active[1].version}}
            note, revoked = self._signer_warning(slot, m, "switched to")
            now += note
            details.update(revoked)
            if probation is not None:
                previous = None if active is None else {"name": active[1].name, "version": active[1].version,
                                                        "slot": active[0].name}
                cand = {**cand, "previous": previous,
                        "probation": {**probation, **extra, "started": self._now(), "resumes": 0}}
                self._enter(rec, S.PROBATION, f"{now}; on probation", candidate=cand)
                return self._result("probation", "probation", f"{now}, on probation (no download)", m, slot, details)
            result = self._result("switched", "standby", f"{now} (no download)", m, slot, details)
            self._enter(rec, S.IDLE, "switched (standby)", candidate=None, last_result=result.to_dict())
            return result

    # ---- recovery -------------------------------------------------------------------------------------
    def recover(self) -> list[str]:
        """Start-up repair (see :mod:`device_agent.updater.recovery`); returns what it did. A no-op while another
        process holds the update lock (that process owns the slots)."""
        try:
            with self.slots.lock():
                return self._recover_locked()
        except BusyError:
            return []

    def _recover_locked(self) -> list[str]:
        return recover_locked(self)
