"""The converging half: ``DesiredHandler`` (the worker thread of the running agent, ``device_agent.runner``)
brings the slots to the accepted desired state; its ``receive`` hands each message to :mod:`.receive`.

``converge()`` (the worker thread; also callable directly):

* a version on probation is watched to its end first (and a watch interrupted by a restart is resumed: a fresh
  window, because the counts died with the process; the baseline was persisted at activation). More than
  ``max_resumes`` restarts during one probation roll it back (``probation_restarts``): an agent that keeps dying
  on the new model must not keep serving it. A newer desired state that names the previous version ends the
  watch at once with a rollback (``desired_rollback``; :mod:`.watch`);
* desired version already active: nothing to do (outcome ``current``);
* desired version in the standby slot, older than the active one: the updater's rollback, no download
  (``rolled_back``, ``desired_rollback``);
* desired version in the standby slot and not older (a version rolled out again after it was rolled back):
  ``Updater.activate_standby``, no download, then probation like any new version. It is reported as a switch to
  the standby slot, never as a rollback (the fleet's gates count a rollback to a version as that version
  failing);
* otherwise ``Updater.deploy``: download (``device_agent.download``: Range resume from
  ``downloads/<sha256>.part``) -> [the serving version's p95 measured: the probation baseline] -> verify -> stage ->
  smoke test -> [maintenance window open? no batch running?] -> activate -> probation (``device_agent.probation``)
  -> committed or rolled back.

Outcomes are stored per seq in ``desired.json``. Final ones (committed, rolled back, rejected package, hash
mismatch, length exceeded, smoke test failed, expired, …) are not retried: the server must publish a new desired
state. Transient ones (connection dropped or stalled, 5xx, full disk, busy, window closed, another process
updating, a crash) are retried with capped exponential backoff while the desired state still asks for it and
has not expired. A partial download is kept only while the accepted desired state names its sha256.

``on_change`` is called after every decision, every update-state transition and every outcome (the runner
queues a report then). Nothing here is global; options come in through ``HandlerOptions``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from edgefleet_contracts.desired import Desired
from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.timeutil import fmt, utcnow

from ..config import DeviceDir
from ..download import DONE_SUFFIX, PART_SUFFIX, DownloadError, download
from ..errors import AgentError
from ..probation import Baseline, ProbationPolicy, Verdict, p95
from ..slots import BusyError
from ..updater import DeferredError, InProbationError, InstallResult, Updater, UpdateRecord, UpdateState
from .options import HandlerOptions
from .receive import Decision, decide
from .record import DESIRED_FILE, DesiredFileError, DesiredRecord
from .watch import finish, watch

if TYPE_CHECKING:
    from ..agent import Agent

log = logging.getLogger("device_agent.desired_handler")  # the handler's one logger, as before the split

DOWNLOADS = "downloads"

# Result reasons worth another try later (everything else is final for that desired seq).
RETRYABLE = frozenset({"download_interrupted", "no_space", "busy", "maintenance_window", "interrupted", "io_error",
                       "in_probation"})


@dataclass(frozen=True)
class Step:
    """What one ``converge()`` pass did, and when to try again (None: when woken; 0: at once)."""

    what: str
    retry_in: float | None = None
    result: InstallResult | None = None


# ---- the shell ----------------------------------------------------------------------------------------
class DesiredHandler:
    """Receives desired states and converges the device to them (see the module docstring)."""

    def __init__(self, device: DeviceDir, *, agent: Agent | None = None, on_change: Callable[[], None] | None = None,
                 options: HandlerOptions | None = None, clock: Callable[[], datetime] = utcnow) -> None:
        """Raises ConfigError when the folder is not a provisioned device."""
        self.device = device
        self.agent = agent
        self.on_change = on_change
        self.clock = clock
        self.cfg = device.load_config()
        self.options = options or HandlerOptions.from_config(self.cfg)
        self.policy = self.options.policy or ProbationPolicy.from_config(self.cfg)
        self.path = device.path / DESIRED_FILE
        self.downloads = device.path / DOWNLOADS
        self._lock = threading.RLock()  # desired.json read-modify-write
        self._work = threading.Lock()  # one converge at a time
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._attempts: dict[int, int] = {}
        self._watching: tuple[str, str] | None = None  # a probation this process started (not a resumed one)
        self._baseline: Baseline | None = None  # the serving version's latency, measured before the install work
        self._http: httpx.Client | None = None  # for downloads, made once: a new client costs ~20 ms of CPU

    # ---- records ----------------------------------------------------------------------------------------
    def record(self) -> DesiredRecord:
        return DesiredRecord.load(self.path)

    def _save(self, rec: DesiredRecord) -> None:
        rec.save(self.path)

    def _changed(self) -> None:
        if self.on_change is None:
            return
        try:
            self.on_change()
        except Exception:  # noqa: BLE001 - a report hook must never break a rollout
            log.exception("on_change hook failed")

    def _updater(self) -> Updater:
        return Updater(self.device, clock=self.clock, on_transition=self._on_transition)

    def _on_transition(self, rec: UpdateRecord) -> None:
        self._changed()

    # ---- receiving ----------------------------------------------------------------------------------------
    def receive(self, payload: bytes) -> Decision:
        """Decide on one desired-state message and persist the decision (see the module docstring).

        Never raises for a bad message: the rejection is recorded and returned."""
        if not payload:
            return Decision("ignored", "empty", "empty desired-state message (the retained state was cleared)")
        with self._lock:
            decision = decide(payload, self.device, self.path, self.cfg.device_id, self.clock)
        level = logging.WARNING if decision.kind == "rejected" else logging.INFO
        log.log(level, "desired state %s (%s): %s", decision.kind, decision.reason, decision.message)
        self._changed()
        if decision.kind in ("accepted", "duplicate"):
            self._wake.set()
        return decision

    # ---- the worker ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the worker thread (it resumes whatever the accepted desired state still asks for)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="desired-state", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker: a download stops (its partial file stays), a probation watch pauses (it resumes at
        the next start)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        if self._http is not None and self._thread is None:
            self._http.close()
            self._http = None

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            try:
                step = self.converge()
            except Exception:  # noqa: BLE001 - the worker must outlive any one failure; logged
                log.exception("desired-state worker failed; trying again")
                step = Step("error", self.options.retry_max)
            if step.retry_in == 0:
                continue
            self._wake.wait(step.retry_in)

    def converge(self) -> Step:
        """One pass towards the accepted desired state; blocks through download, install and probation."""
        with self._work:
            up = self._updater()
            urec = up.record()
            if urec.state == UpdateState.PROBATION:
                return self._probation(up)
            try:
                rec = self.record()
            except DesiredFileError as exc:
                return Step(f"cannot read {self.path}: {exc}", self.options.retry_max)
            d = rec.desired()
            if d is None:
                return Step("no desired state")
            out = rec.outcome
            if out is not None and out.get("seq") == d.seq and out.get("final"):
                return Step(f"seq {d.seq} done ({out.get('status')})")
            active, standby = up.slots.active(), up.slots.standby()
            if active is not None and (active[1].name, active[1].version) == (d.name, d.version):
                self._settle(d, None, "current", "current", f"{d.name} {d.version} is active", final=True)
                return Step("current")
            now = up.trust.now()
            if d.expires <= now:
                self._settle(d, None, "expired", "expired", f"desired state seq {d.seq} expired at {fmt(d.expires)} "
                             f"before {d.name} {d.version} was reached", final=True)
                return Step("expired")
            window = self.options.window
            if window is not None and not window.is_open(self.clock()):
                wait = min(max(1.0, window.seconds_until_open(self.clock())), self.options.retry_max)
                self._settle(d, None, "deferred", "maintenance_window", f"waiting for the maintenance window {window}",
                             final=False, count=False)
                return Step("deferred: maintenance window", wait)
            if standby is not None and (standby[1].name, standby[1].version) == (d.name, d.version):
                return self._switch_to_standby(up, d)
            return self._deploy(up, d)

    # ---- the paths ------------------------------------------------------------------------------------------
    def _switch_to_standby(self, up: Updater, d: Desired) -> Step:
        if up.standby_is_older() is False:
            return self._forward_to_standby(up, d)
        if not self._wait_not_busy():
            self._settle(d, None, "deferred", "busy", "a batch is running; the switch waits", final=False)
            return Step("deferred: busy", self._backoff(d.seq))
        why = f"desired state seq {d.seq} asks for {d.name} {d.version}" + (f" ({d.reason})" if d.reason else "")
        try:
            r = up.rollback("desired_rollback", message=why)
        except BusyError as exc:
            self._settle(d, None, "deferred", exc.reason, str(exc), final=False)
            return Step("deferred: another process is updating", self._backoff(d.seq))
        self._reload_agent()
        return self._after(d, r, retryable=False)

    def _forward_to_standby(self, up: Updater, d: Desired) -> Step:
        """The desired version is the newer one in the standby slot: switch to it and watch it on probation."""
        self._baseline = None  # measured by _before_activate, from the traffic of the version serving now
        return self._activate(up, d, lambda want, probation: up.activate_standby(
            want, probation=probation, before_activate=self._before_activate), reload_after=True)

    def _activate(self, up: Updater, d: Desired, run: Callable[[dict[str, Any], dict[str, Any]], Any],
                  *, reload_after: bool, retryable: Callable[[], bool] = lambda: False) -> Step:
        """Run one updater activation of ``d`` (a deploy or a switch to the standby) and take its result: a busy
        or probation-bound updater defers, a version on probation is watched, anything else is settled."""
        want = {"name": d.name, "version": d.version, "url": d.url, "sha256": d.sha256, "length": d.length,
                "seq": d.seq}
        try:
            r = run(want, self.policy.to_dict())
        except (BusyError, InProbationError) as exc:
            self._settle(d, None, "deferred", exc.reason, str(exc), final=False)
            return Step(f"deferred: {exc.reason}", self._backoff(d.seq))
        if r.status == "probation":
            self._watching = (d.name, d.version)
            self._reload_agent()
            return self._probation(up)
        if reload_after:
            self._reload_agent()
        return self._after(d, r, retryable=retryable() or r.reason in RETRYABLE)

    def _deploy(self, up: Updater, d: Desired) -> Step:
        self._clean_downloads(keep=d.sha256)
        retryable = [False]

        def fetch() -> Path:
            try:
                path = download(d.url, self.downloads, sha256=d.sha256, length=d.length,
                                options=self.options.download, client=self._client(), stop=self._stop)
            except DownloadError as exc:
                retryable[0] = exc.retryable
                raise
            # The baseline is taken now, before verifying, unpacking and smoke-testing load this device: latencies
            # recorded during that work would inflate the previous version's p95 and hide a slower new version.
            self._baseline = self._measure_baseline()
            return path

        self._baseline = None
        return self._activate(up, d, lambda want, probation: up.deploy(
            fetch, want, probation=probation, before_activate=self._before_activate), reload_after=False,
            retryable=lambda: retryable[0])

    def _before_activate(self) -> dict[str, Any]:
        """Runs inside the updater just before the swap: window, busy deferral, the previous version's p95."""
        window = self.options.window
        if window is not None and not window.is_open(self.clock()):
            raise DeferredError("maintenance_window", f"the maintenance window {window} closed before the swap; "
                                "the swap waits for the next one")
        if not self._wait_not_busy():
            raise DeferredError("busy", f"a batch has been running for over {self.options.busy_timeout:g} s; the swap "
                                "waits until no batch runs")
        baseline = self._baseline
        if baseline is None or baseline.samples < self.policy.min_samples:
            baseline = self._measure_baseline() or baseline  # no traffic before the install work: what there is now
        return {"baseline": None if baseline is None else baseline.to_dict()}

    def _measure_baseline(self) -> Baseline | None:
        """p95 of the recent latencies of the version the agent serves (None without an agent or traffic)."""
        agent = self.agent
        m = agent.model if agent is not None else None
        if agent is None or m is None:
            return None
        snap = agent.version_stats(m.name, m.version)
        if not snap.latencies_ms:
            return None
        return Baseline(m.version, p95(snap.latencies_ms), len(snap.latencies_ms))

    def _probation(self, up: Updater) -> Step:
        rec = up.record()
        cand = dict(rec.candidate or {})
        name, version, slot = str(cand.get("name")), str(cand.get("version")), str(cand.get("slot"))
        resumed = self._watching != (name, version)
        if resumed:
            try:
                again = up.note_probation_resume()
            except BusyError:
                return Step("probation: another process holds the update lock", self.options.retry_initial)
            if again is None:
                return Step("probation ended elsewhere", 0)
            cand = again
            self._watching = (name, version)
        prob = dict(cand.get("probation") or {})
        policy = ProbationPolicy.from_dict(prob, self.policy)
        baseline = Baseline.from_dict(prob.get("baseline"))
        resumes = int(prob.get("resumes", 0))
        if resumes > policy.max_resumes:
            verdict = Verdict("fail", "probation_restarts", f"probation: the agent restarted {resumes} times during "
                              f"the probation of {name} {version} (limit {policy.max_resumes})", {"resumes": resumes})
        else:
            if resumed:
                log.warning("resuming the probation of %s %s (restart %d of at most %d)", name, version, resumes,
                            policy.max_resumes)
            watched = watch(up, self.agent, policy, baseline, name, version, slot, cand, stop=self._stop,
                            poll=self.options.poll, reload_agent=self._reload_agent, accepted=self._accepted,
                            wake=self._wake, files_every=max(self.options.poll, 1.0))
            if watched is None:
                self._watching = None
                return Step("probation paused (stopping)" if self._stop.is_set() else "probation ended elsewhere",
                            None if self._stop.is_set() else 0)
            verdict = Verdict(watched.outcome, watched.reason, watched.message, {**watched.details, "resumes": resumes})
        result = finish(up, verdict, (name, version), stop=self._stop, retry_initial=self.options.retry_initial,
                        retry_max=self.options.retry_max)
        self._watching = None
        self._reload_agent()
        seq = cand.get("seq")
        if result is not None and isinstance(seq, int):
            self._settle_seq(seq, result.status, result.reason, result.message, final=True)
            self._clean_downloads(keep=None)
        return Step(f"probation: {verdict.outcome} ({verdict.reason})", 0, result)

    def _client(self) -> httpx.Client:
        """The download client, made on first use (its SSL context is what costs). It keeps no idle connection:
        a rollout downloads once, and a connection the server closed meanwhile would fail the next download."""
        if self._http is None:
            self._http = httpx.Client(follow_redirects=True, limits=httpx.Limits(max_keepalive_connections=0))
        return self._http

    def _accepted(self) -> Desired | None:
        """The accepted desired state now; None when there is none or desired.json cannot be read."""
        try:
            return self.record().desired()
        except (DesiredFileError, ContractError):
            return None

    # ---- helpers ------------------------------------------------------------------------------------------
    def _after(self, d: Desired, r: InstallResult, *, retryable: bool) -> Step:
        if r.ok or not retryable:
            self._settle(d, r, r.status, r.reason, r.message, final=True)
            return Step(f"{r.status} ({r.reason})", 0, r)
        self._settle(d, r, r.status, r.reason, r.message, final=False)
        return Step(f"{r.status} ({r.reason}); retrying", self._backoff(d.seq), r)

    def _settle(self, d: Desired, r: InstallResult | None, status: str, reason: str, message: str, *, final: bool,
                count: bool = True) -> None:
        if count and not final:
            self._attempts[d.seq] = self._attempts.get(d.seq, 0) + 1
        self._settle_seq(d.seq, status, reason, message, final=final)
        if final:
            self._clean_downloads(keep=None)

    def _settle_seq(self, seq: int, status: str, reason: str, message: str, *, final: bool) -> None:
        with self._lock:
            try:
                rec = self.record()
            except DesiredFileError:
                return
            if rec.last_seq != seq:
                return  # a newer desired state was accepted meanwhile: its own outcome follows
            new = {"seq": seq, "status": status, "reason": reason, "message": message, "final": final,
                   "attempts": self._attempts.get(seq, 0)}
            old = rec.outcome or {}
            if {k: old.get(k) for k in new} == new:
                return
            rec.outcome = {**new, "at": fmt(self.clock())}
            self._save(rec)
        self._changed()

    def _backoff(self, seq: int) -> float:
        n = max(1, self._attempts.get(seq, 1))
        return min(self.options.retry_max, self.options.retry_initial * 2 ** (n - 1))

    def _wait_not_busy(self) -> bool:
        agent = self.agent
        if agent is None:
            return True
        deadline = time.monotonic() + self.options.busy_timeout
        while agent.busy():
            if time.monotonic() >= deadline or self._stop.wait(0.05):
                return False
        return True

    def _reload_agent(self) -> None:
        if self.agent is None:
            return
        try:
            self.agent.reload()
        except AgentError as exc:
            log.warning("the agent cannot load the active slot: %s", exc)
        except Exception:  # an OS error (disk full) must not end the handler's thread; the next tick retries
            log.exception("reloading the agent failed unexpectedly; its ticker retries every second")

    def _clean_downloads(self, keep: str | None) -> None:
        """Delete downloads other than those of sha256 ``keep`` (None: the accepted one, if it is still wanted)."""
        if keep is None:
            try:
                rec = self.record()
                d = rec.desired()
                final = rec.outcome is not None and rec.outcome.get("seq") == rec.last_seq and rec.outcome.get("final")
                keep = d.sha256 if d is not None and not final else ""
            except (DesiredFileError, ContractError):
                return
        if not self.downloads.is_dir():
            return
        for p in self.downloads.iterdir():
            if p.name in (f"{keep}{PART_SUFFIX}", f"{keep}{DONE_SUFFIX}"):
                continue
            try:
                p.unlink()
            except OSError as exc:
                log.warning("cannot delete %s: %s", p, exc)
