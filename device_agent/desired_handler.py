"""The device's side of a rollout: signed desired-state messages in, the slots converged to them out.

Two halves, on two threads of the running agent (``device_agent.runner``):

``receive(payload)`` (the MQTT link's thread; fast, no network) decides on one message of the retained
``…/desired`` topic and persists the decision in ``desired.json`` (atomic):

* the payload is parsed with the untrusted-JSON parser, then ``accept_desired`` checks it with the pinned
  ``keys/fleet.pub``, this device's id, the last accepted ``seq`` and ``now = max(wall clock, trust-store
  high-water)``; then the version policy (``check_move``): the same model name moves forward, or back only to the
  version held in the standby slot (a different model name is allowed, as for ``device-agent install``);
* a **rejection** (bad or unknown signature, replay, expired, another device, a version it may not move to,
  unreadable JSON) is recorded as ``last_rejection`` with its reason token and message, and changes nothing
  else: not the last accepted seq, not the slots, not the trust store;
* the **same** document as the one already accepted (the broker re-delivers the retained message on every
  reconnect) is a ``duplicate``: no rejection, no change; it only wakes the worker;
* an **accepted** one becomes ``accepted`` (the envelope verbatim) with ``last_seq``, and wakes the worker.

``converge()`` (the worker thread; also callable directly) brings the slots to the accepted desired state:

* a version on probation is watched to its end first (and a watch interrupted by a restart is resumed: a fresh
  window, because the counts died with the process; the baseline was persisted at activation). More than
  ``max_resumes`` restarts during one probation roll it back (``probation_restarts``): an agent that keeps dying
  on the new model must not keep serving it. A newer desired state that names the previous version ends the
  watch at once with a rollback (``desired_rollback``);
* desired version already active: nothing to do (outcome ``current``);
* desired version in the standby slot: the updater's signed-rollback path, no download;
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

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from datetime import time as dtime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgefleet_contracts.atomic import atomic_write_text
from edgefleet_contracts.canonical import canonical_bytes, parse_json
from edgefleet_contracts.desired import Desired, accept_desired
from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.manifest import Manifest
from edgefleet_contracts.timeutil import fmt, utcnow
from edgefleet_contracts.versions import is_newer

from .config import DeviceDir
from .download import DONE_SUFFIX, PART_SUFFIX, DownloadError, DownloadOptions, download
from .errors import AgentError
from .probation import Baseline, ProbationPolicy, ProbationWatch, StatsSnapshot, Verdict, p95
from .slots import BusyError, Slots
from .trust_store import TrustStore
from .updater import DeferredError, InProbationError, InstallResult, Updater, UpdateRecord, UpdateState

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger(__name__)

DESIRED_FILE = "desired.json"
DOWNLOADS = "downloads"
DESIRED_SPEC = 1
# Result reasons worth another try later (everything else is final for that desired seq).
RETRYABLE = frozenset({"download_interrupted", "no_space", "busy", "maintenance_window", "interrupted", "io_error",
                       "in_probation"})

__all__ = ["DESIRED_FILE", "Decision", "DesiredFileError", "DesiredHandler", "DesiredRecord", "HandlerOptions",
           "MaintenanceWindow", "Step", "VersionNotAllowedError", "check_move", "read_desired_seq"]


class VersionNotAllowedError(AgentError):
    """The desired version is older than the active one and not the one held in standby."""

    reason = "version_not_allowed"


class DesiredFileError(AgentError):
    """desired.json cannot be read: the device cannot tell a replay, so it refuses every desired state."""

    reason = "desired_store"


# ---- pure parts ---------------------------------------------------------------------------------------
def check_move(d: Desired, active: Manifest | None, standby: Manifest | None) -> None:
    """May this device move to ``d``? Raises VersionNotAllowedError when not (see the module docstring)."""
    if active is None or d.name != active.name or d.version == active.version or is_newer(d.version, active.version):
        return
    if standby is not None and (standby.name, standby.version) == (d.name, d.version):
        return
    held = f"{standby.name} {standby.version}" if standby is not None else "nothing"
    raise VersionNotAllowedError(
        f"desired {d.name} {d.version} is older than the active {active.version} and is not the version held in "
        f"standby ({held}); a device moves back only to the version it holds")


@dataclass(frozen=True)
class MaintenanceWindow:
    """A daily UTC window ``HH:MM-HH:MM`` (may wrap midnight) in which a model may be swapped."""

    start: dtime
    end: dtime

    @classmethod
    def parse(cls, text: str) -> MaintenanceWindow:
        """Raises ValueError for anything but ``HH:MM-HH:MM`` with different ends."""
        try:
            a, b = (dtime.fromisoformat(p.strip()) for p in text.split("-"))
        except ValueError:
            raise ValueError(f"maintenance window {text!r} must look like 02:00-04:00 (UTC)") from None
        if a == b:
            raise ValueError(f"maintenance window {text!r} is empty")
        return cls(a, b)

    def is_open(self, now: datetime) -> bool:
        t = now.time().replace(tzinfo=None)
        if self.start < self.end:
            return self.start <= t < self.end
        return t >= self.start or t < self.end

    def seconds_until_open(self, now: datetime) -> float:
        if self.is_open(now):
            return 0.0
        t = now.time().replace(tzinfo=None)
        secs = (self.start.hour * 3600 + self.start.minute * 60) - (t.hour * 3600 + t.minute * 60 + t.second)
        return float(secs % 86400)

    def __str__(self) -> str:
        return f"{self.start:%H:%M}-{self.end:%H:%M} UTC"


@dataclass(frozen=True)
class HandlerOptions:
    policy: ProbationPolicy | None = None  # None: from config.toml (probation_seconds, probation_predictions)
    download: DownloadOptions = field(default_factory=DownloadOptions)
    window: MaintenanceWindow | None = None
    busy_timeout: float = 300.0  # wait this long for a running batch to end before deferring the swap
    retry_initial: float = 1.0
    retry_max: float = 60.0
    poll: float = 0.1  # probation watch interval

    @classmethod
    def from_config(cls, cfg: Any) -> HandlerOptions:
        """Read the rollout keys of config.toml when it has them (``maintenance_window``, ``download_rate_limit``,
        ``download_read_timeout``, ``busy_defer_seconds``); defaults otherwise."""
        window = str(getattr(cfg, "maintenance_window", "") or "")
        rate = float(getattr(cfg, "download_rate_limit", 0) or 0)
        return cls(policy=ProbationPolicy.from_config(cfg),
                   download=DownloadOptions(rate_limit=rate or None,
                                            read_timeout=float(getattr(cfg, "download_read_timeout", 30.0))),
                   window=MaintenanceWindow.parse(window) if window else None,
                   busy_timeout=float(getattr(cfg, "busy_defer_seconds", 300.0)))


@dataclass
class DesiredRecord:
    """desired.json: the newest accepted desired state, the last rejection, the outcome for the accepted seq."""

    last_seq: int = 0
    accepted: dict[str, Any] | None = None  # the accepted envelope, verbatim
    accepted_at: str | None = None
    last_rejection: dict[str, Any] | None = None  # {"at", "seq", "reason", "message"}
    outcome: dict[str, Any] | None = None  # {"seq", "status", "reason", "message", "at", "final", "attempts"}

    def desired(self) -> Desired | None:
        if self.accepted is None:
            return None
        return Desired.from_signed(self.accepted.get("signed"))

    def to_json(self) -> str:
        return json.dumps({"spec": DESIRED_SPEC, **asdict(self)}, indent=1, sort_keys=True) + "\n"

    @classmethod
    def load(cls, path: Path) -> DesiredRecord:
        """A fresh record when absent. Raises DesiredFileError when unreadable."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return cls()
        except OSError as exc:
            raise DesiredFileError(f"cannot read {path}: {exc}") from None
        try:
            d = parse_json(data, what=str(path))
            if not isinstance(d, dict) or d.get("spec") != DESIRED_SPEC:
                raise DesiredFileError(f"{path} is not a desired-state record (spec {DESIRED_SPEC})")
            seq = d.get("last_seq")
            if not isinstance(seq, int) or isinstance(seq, bool) or seq < 0:
                raise DesiredFileError(f"{path}: last_seq must be a whole number")
            return cls(seq, d.get("accepted"), d.get("accepted_at"), d.get("last_rejection"), d.get("outcome"))
        except ContractError as exc:
            raise DesiredFileError(f"{path} is unreadable ({exc}); the device refuses desired states until it is "
                                   "repaired or removed") from None


def read_desired_seq(device: DeviceDir) -> int:
    """The last accepted desired-state seq (0 when none, or when desired.json is unreadable)."""
    try:
        return DesiredRecord.load(device.path / DESIRED_FILE).last_seq
    except DesiredFileError:
        return 0


@dataclass(frozen=True)
class Decision:
    kind: str  # "accepted" | "rejected" | "duplicate" | "ignored"
    reason: str
    message: str
    seq: int | None = None


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

    # ---- records ----------------------------------------------------------------------------------------
    def record(self) -> DesiredRecord:
        return DesiredRecord.load(self.path)

    def _save(self, rec: DesiredRecord) -> None:
        atomic_write_text(self.path, rec.to_json())

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
            decision = self._decide(payload)
        level = logging.WARNING if decision.kind == "rejected" else logging.INFO
        log.log(level, "desired state %s (%s): %s", decision.kind, decision.reason, decision.message)
        self._changed()
        if decision.kind in ("accepted", "duplicate"):
            self._wake.set()
        return decision

    def _decide(self, payload: bytes) -> Decision:
        env: Any = None
        try:
            rec = self.record()
        except DesiredFileError as exc:
            return Decision("rejected", exc.reason, str(exc))
        try:
            env = parse_json(payload, what="desired state")
            if rec.accepted is not None and isinstance(env, dict) and _same(env.get("signed"), rec.accepted["signed"]):
                return Decision("duplicate", "duplicate", f"seq {rec.last_seq} again (already accepted)", rec.last_seq)
            trust = TrustStore(self.device, clock=self.clock)
            d = accept_desired(env, trust.fleet, device_id=self.cfg.device_id, last_seq=rec.last_seq, now=trust.now())
            slots = Slots(self.device)
            active, standby = slots.active(), slots.standby()
            check_move(d, active[1] if active else None, standby[1] if standby else None)
        except (ContractError, AgentError) as exc:
            seq = _seq_of(env)
            rec.last_rejection = {"at": fmt(self.clock()), "seq": seq, "reason": exc.reason, "message": str(exc)}
            self._save(rec)
            return Decision("rejected", exc.reason, str(exc), seq)
        rec.last_seq, rec.accepted, rec.accepted_at, rec.outcome = d.seq, env, fmt(self.clock()), None
        self._save(rec)
        return Decision("accepted", "accepted", f"seq {d.seq}: {d.name} {d.version}"
                        + (f" ({d.reason})" if d.reason else ""), d.seq)

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

    # ---- the three paths ------------------------------------------------------------------------------------
    def _switch_to_standby(self, up: Updater, d: Desired) -> Step:
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

    def _deploy(self, up: Updater, d: Desired) -> Step:
        self._clean_downloads(keep=d.sha256)
        retryable = [False]

        def fetch() -> Path:
            try:
                path = download(d.url, self.downloads, sha256=d.sha256, length=d.length,
                                options=self.options.download, stop=self._stop)
            except DownloadError as exc:
                retryable[0] = exc.retryable
                raise
            # The baseline is taken now, before verifying, unpacking and smoke-testing load this device: latencies
            # recorded during that work would inflate the previous version's p95 and hide a slower new version.
            self._baseline = self._measure_baseline()
            return path

        want = {"name": d.name, "version": d.version, "url": d.url, "sha256": d.sha256, "length": d.length,
                "seq": d.seq}
        self._baseline = None
        try:
            r = up.deploy(fetch, want, probation=self.policy.to_dict(), before_activate=self._before_activate)
        except (BusyError, InProbationError) as exc:
            self._settle(d, None, "deferred", exc.reason, str(exc), final=False)
            return Step(f"deferred: {exc.reason}", self._backoff(d.seq))
        if r.status == "probation":
            self._watching = (d.name, d.version)
            self._reload_agent()
            return self._probation(up)
        return self._after(d, r, retryable=retryable[0] or r.reason in RETRYABLE)

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
            watched = self._watch(up, policy, baseline, name, version, slot, cand)
            if watched is None:
                self._watching = None
                return Step("probation paused (stopping)" if self._stop.is_set() else "probation ended elsewhere",
                            None if self._stop.is_set() else 0)
            verdict = Verdict(watched.outcome, watched.reason, watched.message, {**watched.details, "resumes": resumes})
        result = self._finish(up, verdict, (name, version))
        self._watching = None
        self._reload_agent()
        seq = cand.get("seq")
        if result is not None and isinstance(seq, int):
            self._settle_seq(seq, result.status, result.reason, result.message, final=True)
            self._clean_downloads(keep=None)
        return Step(f"probation: {verdict.outcome} ({verdict.reason})", 0, result)

    def _watch(self, up: Updater, policy: ProbationPolicy, baseline: Baseline | None, name: str, version: str,
               slot: str, cand: dict[str, Any]) -> Verdict | None:
        """Watch until a verdict; None when the handler stops or someone else ended the probation."""
        agent = self.agent

        def read() -> StatsSnapshot:
            return agent.version_stats(name, version) if agent is not None else StatsSnapshot()

        def serving() -> bool:
            m = agent.model if agent is not None else None
            return agent is None or (m is not None and (m.name, m.version) == (name, version))

        watch = ProbationWatch(policy, baseline, read, serving=serving, smoke=lambda: up.slots.is_ready(slot))
        previous = cand.get("previous") or {}
        next_reload = 0.0
        while True:
            if self._stop.is_set():
                return None
            if not serving() and time.monotonic() >= next_reload:
                self._reload_agent()
                next_reload = time.monotonic() + 1.0
            verdict = watch.poll()
            if verdict.outcome != "watch":
                return verdict
            asked = self._newer_asks_for(previous, cand.get("seq"))
            if asked is not None:
                return Verdict("fail", "desired_rollback", f"desired state seq {asked.seq} asks for {asked.name} "
                               f"{asked.version}" + (f" ({asked.reason})" if asked.reason else "")
                               + f"; probation of {name} {version} ended", verdict.details)
            if up.record().state != UpdateState.PROBATION:
                return None
            self._stop.wait(self.options.poll)

    def _newer_asks_for(self, previous: dict[str, Any], seq: Any) -> Desired | None:
        try:
            d = self.record().desired()
        except (DesiredFileError, ContractError):
            return None
        if d is None or not isinstance(seq, int) or d.seq <= seq:
            return None
        return d if (d.name, d.version) == (previous.get("name"), previous.get("version")) else None

    def _finish(self, up: Updater, verdict: Verdict, expect: tuple[str, str]) -> InstallResult | None:
        deadline = time.monotonic() + max(30.0, self.options.retry_max)
        while True:
            try:
                result = up.finish_probation(verdict.outcome == "pass", verdict.reason, verdict.message,
                                             verdict.details, expect=expect)
            except BusyError:
                if time.monotonic() > deadline or self._stop.wait(self.options.retry_initial):
                    return None
                continue
            if result is not None:
                level = logging.INFO if result.status == "committed" else logging.WARNING
                log.log(level, "probation of %s %s: %s (%s): %s", expect[0], expect[1], result.status, result.reason,
                        result.message)
            return result

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


def _same(a: Any, b: Any) -> bool:
    try:
        return canonical_bytes(a) == canonical_bytes(b)
    except ContractError:
        return False


def _seq_of(env: Any) -> int | None:
    if isinstance(env, dict) and isinstance(env.get("signed"), dict):
        seq = env["signed"].get("seq")
        if isinstance(seq, int) and not isinstance(seq, bool):
            return seq
    return None
