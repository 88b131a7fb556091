"""Rollouts in the store, their health snapshots, desired state per device, and the loop that runs them.

Desired states are signed with the fleet key (per-device sequence numbers, expiry) and published retained on
each device's ``desired`` topic; a desired state that could not be published (broker down) stays marked and is
re-published on the next tick. Rollout state is persisted after every step, so a server restart resumes each
rollout where it was.

Trust: a version is judged as a device holding the newest keyset the server has verified would judge it
(``registry.judge_published``, the rule publish applies) before devices are sent to it. A version published before
the server learnt of a keyset that revokes its signing key, or one that has expired since, is refused when a
rollout of it starts or a rollback goes to it (a ContractError: 422 from the API naming the reason, exit 1 from
the CLI), and a running rollout whose version becomes untrusted is paused before it asks more devices to move.
Reverts are never refused, as reverting is how an operator recovers: an abort or an automatic rollback sends
devices back to the previous version even when it is no longer trusted (a device that still holds it in its standby
slot switches back, checking its expiry and files but not its signature; any other device refuses to install it),
and the rollout's log gets a ``warning`` decision saying why; a rollout started with such a previous version gets
that warning at its start. A data folder without its root key (``keys/root.pub``) cannot judge: the
check is skipped and logged (the devices still judge).
"""

from __future__ import annotations

import functools
import json
import logging
import secrets
import threading
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import numpy as np

from edgefleet_contracts.desired import Desired, sign_desired
from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.signing import Ed25519PrivateKey, load_private_key
from edgefleet_contracts.summary import LATENCY_EDGES_MS
from edgefleet_contracts.timeutil import DailyWindow, parse
from edgefleet_contracts.topics import topic
from edgefleet_contracts.versions import is_newer

from ..errors import ConfigError, ConflictError, FleetError, NotFoundError, RequestError
from ..registry import judge_published, version_row
from ..settings import ServerSettings
from ..store import Store
from . import params
from .engine import TERMINAL, Decision, Rollout, StepResult, in_window, step
from .gates import DEFAULT_THRESHOLDS, GroupStats, Snapshot
from .plan import in_cohort, stage_devices

if TYPE_CHECKING:
    from .publisher import MqttPublisher

log = logging.getLogger("edgefleet.rollouts")
DESIRED_LIFETIME = timedelta(days=7)


# ---- persistence --------------------------------------------------------------------------------------------
def _load(row: Any) -> Rollout:
    return Rollout(
        id=row["id"], model=row["model"], version=row["version"], previous=row["previous"],
        cohort=json.loads(row["cohort"]), stages=json.loads(row["stages"]), bake_seconds=row["bake_seconds"],
        max_per_minute=row["max_per_minute"], window=row["maint_window"], thresholds=json.loads(row["thresholds"]),
        approve_stages=json.loads(row["approve_stages"]), state=row["state"], stage=row["stage"],
        stage_started=row["stage_started"], approved=json.loads(row["approved"]),
        targeted=json.loads(row["targeted"]), kind=row["kind"], updated=row["updated"],
    )


def _save(c: Any, r: Rollout, now: float) -> None:
    c.execute(
        "UPDATE rollouts SET state=?, stage=?, stage_started=?, approved=?, targeted=?, updated=? WHERE id=?",
        (r.state, r.stage, r.stage_started, json.dumps(r.approved), json.dumps(r.targeted), now, r.id))


def _decide(c: Any, rollout_id: str, d: Decision, now: float) -> None:
    c.execute("INSERT INTO rollout_decisions (rollout, at, actor, kind, detail, evidence) VALUES (?, ?, ?, ?, ?, ?)",
              (rollout_id, now, d.actor, d.kind, d.detail, json.dumps(d.evidence, default=str)))


def get(store: Store, rollout_id: str) -> Rollout:
    row = store.one("SELECT * FROM rollouts WHERE id = ?", (rollout_id,))
    if row is None:
        raise NotFoundError(f"unknown rollout {rollout_id!r}")
    r = _load(row)
    r.paused_seconds = _paused_seconds(store, r)
    # the current stage's bake has begun when a ``bake`` decision was logged at (or after) its start: the engine
    # logs it as it sets ``stage_started`` to that moment
    r.baking = store.one("SELECT 1 FROM rollout_decisions WHERE rollout = ? AND kind = 'bake' AND at >= ? LIMIT 1",
                         (r.id, r.stage_started)) is not None
    return r


def _paused_seconds(store: Store, r: Rollout) -> float:
    """How long ``r``'s current stage was paused: the ``pause`` .. ``resume`` spans of its decision log since
    ``stage_started`` (a pause still in force is not counted: a paused rollout does not bake)."""
    total, paused_at = 0.0, None
    for d in store.query("SELECT kind, at FROM rollout_decisions WHERE rollout = ? AND kind IN ('pause', 'resume') "
                         "ORDER BY id", (r.id,)):
        if d["kind"] == "pause":
            paused_at = d["at"] if paused_at is None else paused_at
        elif paused_at is not None:
            total += max(0.0, d["at"] - max(paused_at, r.stage_started))
            paused_at = None
    return total


def status(store: Store, rollout_id: str, now: float | None = None) -> dict[str, Any]:
    """A rollout as the CLI's ``rollout status`` and ``GET /api/v1/rollouts/ID`` show it: what it was started
    with (stages, cohort, bake, thresholds, approvals, ``window`` — ``""`` for any time — and ``max_per_minute``,
    0 for no limit), where it is, its devices per state and its decision log.

    ``devices`` counts the devices asked so far by what they report (``deferred: REASON`` when a device holds the
    desired state and waits, e.g. for its own maintenance window); ``not_yet_asked`` the current stage's devices
    the rollout has not asked yet (rate limit, window, approval).

    ``waiting_for_window`` is true when the rollout is running outside its maintenance window with devices of the
    current stage not yet asked to move: they are asked when the window opens (``window_opens_in_seconds``, else
    None). Raises NotFoundError for an unknown id."""
    now = time.time() if now is None else now
    r = get(store, rollout_id)
    decisions = [
        {"at": d["at"], "actor": d["actor"], "kind": d["kind"], "detail": d["detail"],
         "evidence": json.loads(d["evidence"])}
        for d in store.query("SELECT * FROM rollout_decisions WHERE rollout = ? ORDER BY id", (rollout_id,))
    ]
    reported = _reported(store)
    revoked = {row[0] for row in store.query("SELECT device_id FROM devices WHERE revoked IS NOT NULL")}
    seqs = {row[0]: row[1] for row in store.query("SELECT device_id, seq FROM desired WHERE rollout = ?",
                                                   (rollout_id,))}
    states: Counter[str] = Counter()
    for dev in r.targeted:
        if dev in revoked:  # no longer part of the fleet: not pending for ever
            states["revoked"] += 1
            continue
        rep = reported.get(dev) or {}
        active = (rep.get("active") or {}).get("version")
        lr = rep.get("last_result") or {}
        if active == r.version:
            states["on_new_version"] += 1
        elif _install_failed(lr, r.version, r.targeted[dev]):
            states[str(lr.get("status"))] += 1
        elif (why := _deferred(rep, seqs.get(dev))) is not None:
            states[f"deferred: {why}"] += 1  # the device holds it and waits (its window, a batch, space, ...)
        else:
            states["pending"] += 1
    return {
        "id": r.id, "kind": r.kind, "model": r.model, "version": r.version, "previous": r.previous,
        "cohort": r.cohort, "stages": r.stages, "stage": r.stage + 1, "state": r.state,
        "bake_seconds": r.bake_seconds, "thresholds": {**DEFAULT_THRESHOLDS, **r.thresholds},
        "approve_stages": [s + 1 for s in r.approve_stages], "window": r.window, "max_per_minute": r.max_per_minute,
        **_window_wait(store, r, now), "targeted": len(r.targeted), "not_yet_asked": _not_yet_asked(store, r),
        "devices": dict(states), "other_target": _left_out(store, r), "decisions": decisions,
    }


def _left_out(store: Store, r: Rollout) -> list[str]:
    """Cohort devices a rollout leaves out because they report another target than its package's (sorted)."""
    if r.kind != "rollout":
        return []
    tags = dict(_devices(store))
    return sorted(d for d in _other_target(store, r.model, r.version) if d in tags and in_cohort(tags[d], r.cohort))


def _deferred(report: dict[str, Any], seq: int | None) -> str | None:
    """The reason a device gives for waiting with the desired state ``seq`` this rollout sent it (its report's
    ``desired_outcome``: ``deferred`` for its maintenance window, a running batch, no space, ...), else None."""
    outcome = report.get("desired_outcome") or {}
    if seq is None or outcome.get("seq") != seq or outcome.get("status") != "deferred":
        return None
    return str(outcome.get("reason") or "waiting")


def _not_yet_asked(store: Store, r: Rollout) -> int:
    """Devices of the current stage the rollout has not asked yet (its rate limit, its window, an approval)."""
    if r.state in ("completed", "rolled_back", "aborted") or r.kind != "rollout":
        return 0
    members = stage_devices(r.model, _rollout_devices(store, r), r.cohort, r.stages[r.stage])
    return sum(1 for d in members if d not in r.targeted)


def _window_wait(store: Store, r: Rollout, now: float) -> dict[str, Any]:
    """``waiting_for_window`` and ``window_opens_in_seconds`` of :func:`status`."""
    if not r.window or r.state != "running" or in_window(r.window, now):
        return {"waiting_for_window": False, "window_opens_in_seconds": None}
    members = stage_devices(r.model, _rollout_devices(store, r), r.cohort, r.stages[r.stage])
    waiting = any(d not in r.targeted for d in members)
    opens = DailyWindow.parse(r.window).seconds_until_open(datetime.fromtimestamp(now, UTC))
    return {"waiting_for_window": waiting, "window_opens_in_seconds": opens if waiting else None}


def list_rollouts(store: Store, *, limit: int | None = None, before: str | None = None) -> list[dict[str, Any]]:
    """Rollouts and rollbacks newest first (by creation, then id), those after the rollout ``before`` in that
    order (exclusive: older than it), at most ``limit`` (all when None). Raises RequestError when ``before`` is not
    a rollout id."""
    where = ""
    args: tuple[Any, ...] = ()
    if before is not None:
        cursor = store.one("SELECT created FROM rollouts WHERE id = ?", (before,))
        if cursor is None:
            raise RequestError(f"before={before!r} is not a rollout id; pass the id of the last rollout of a page")
        where, args = " WHERE (created, id) < (?, ?)", (cursor["created"], before)
    sql = ("SELECT id, kind, model, version, state, stage, stages, created FROM rollouts" + where
           + " ORDER BY created DESC, id DESC" + (" LIMIT ?" if limit is not None else ""))
    # named columns: ``targeted`` (every moved device) is not read for a list
    return [{"id": r["id"], "kind": r["kind"], "model": r["model"], "version": r["version"], "state": r["state"],
             "stage": r["stage"] + 1, "stages": json.loads(r["stages"]), "created": r["created"]}
            for r in store.query(sql, args if limit is None else (*args, limit))]


def _reported(store: Store) -> dict[str, dict[str, Any]]:
    return {r["device_id"]: json.loads(r["reported"]) if r["reported"] else {}
            for r in store.query("SELECT device_id, reported FROM devices")}


def _devices(store: Store) -> list[tuple[str, dict[str, str]]]:
    """The fleet's devices and their tags; revoked devices are no longer part of it (never targeted)."""
    return [(r["device_id"], json.loads(r["tags"]))
            for r in store.query("SELECT device_id, tags FROM devices WHERE revoked IS NULL")]


def _other_target(store: Store, model: str, version: str) -> set[str]:
    """Devices that report a target profile other than the one ``model`` ``version`` is built for: they would refuse
    it (``_check_targets``), so a running rollout leaves them out of its stages (a device that reports such a target
    only after the start, or joins the cohort later)."""
    built = version_row(store, model, version)["target"]
    return {d for d, rep in _reported(store).items() if (rep.get("target") or "") not in ("", built)}


def _rollout_devices(store: Store, r: Rollout) -> list[tuple[str, dict[str, str]]]:
    """The fleet's devices a rollout's stages are drawn from: ``_devices`` less ``_other_target``."""
    other = _other_target(store, r.model, r.version) if r.kind == "rollout" else set()
    return [(d, tags) for d, tags in _devices(store) if d not in other]


def _check_cohort_matches(devices: list[tuple[str, dict[str, str]]], cohort: Mapping[str, str], name: str) -> None:
    """A cohort that matches no enrolled device while the fleet has some is a mistyped tag (``site=nowhere``):
    refused, listing the values each of its keys has, rather than a rollout that waits for ever or a rollback
    "completed" on no device. (An empty fleet is not refused: nothing is known to compare with.) Raises
    RequestError."""
    if not cohort or not devices or any(in_cohort(tags, cohort) for _, tags in devices):
        return
    known = []
    for key in sorted(cohort):
        values = sorted({tags[key] for _, tags in devices if key in tags})
        shown = ", ".join(values[:20]) + (f", … ({len(values)} in all)" if len(values) > 20 else "")
        known.append(f"{key}: {shown}" if values else f"{key}: no device has this tag")
    wanted = ",".join(f"{k}={v}" for k, v in sorted(cohort.items()))
    raise RequestError(f"{name} {wanted} matches none of the {len(devices)} enrolled devices; the values in use are "
                       f"{'; '.join(known)} (enrol or tag the devices first)")


def _check_targets(reported: Mapping[str, dict[str, Any]], devices: list[str], row: Any, doing: str,
                   cohort_name: str) -> None:
    """A device installs only a package built for its own target profile (it refuses any other as
    ``wrong_target``), so sending a package to devices that report another target would fail each of them and,
    in a rollout, trip the install-failure gate into rolling back the devices it fits. Refused instead, naming
    them. Devices that have not reported their target (not yet reported, or an agent older than the field) are not
    judged: they judge for themselves. Raises ConflictError."""
    built = row["target"]
    other: dict[str, list[str]] = {}
    for d in devices:
        t = (reported.get(d) or {}).get("target") or ""
        if t and t != built:
            other.setdefault(t, []).append(d)
    if not other:
        return
    n = sum(len(v) for v in other.values())
    shown = "; ".join(f"{t}: {', '.join(ds[:10])}{f' and {len(ds) - 10} more' if len(ds) > 10 else ''}"
                      for t, ds in sorted(other.items()))
    raise ConflictError(
        f"{doing}: {row['name']} {row['version']} is built for target {built}, and {n} of the {len(devices)} "
        f"device(s) of the {cohort_name} run another target, so they would refuse it ({shown}). Narrow "
        f"{cohort_name} with a tag that leaves them out, or publish a version built for their target")


# ---- trust --------------------------------------------------------------------------------------------------
def untrusted(store: Store, model: str, version: str, now: float) -> ContractError | None:
    """Why devices holding the server's newest keyset refuse published ``model`` ``version`` at ``now``
    (``registry.judge_published`` over the data folder that holds ``store``); None when they accept it. Raises
    NotFoundError (not published), ConfigError (the root key is missing or unusable, or the stored keyset is):
    no version is sent to devices unjudged."""
    settings = ServerSettings(data_dir=store.path.parent)  # the data folder holds fleet.sqlite (``db_path``)
    if not settings.root_pub.exists():
        raise ConfigError(f"cannot judge {model} {version}: the data folder has no root key at {settings.root_pub} "
                          "(a folder made by `fleet-server init` has one); nothing is sent to devices unjudged")
    try:
        judge_published(store, settings.packages_dir, settings.root_pub, model, version,
                        datetime.fromtimestamp(now, UTC))
    except ContractError as exc:
        return exc
    return None


def _require_trusted(store: Store, model: str, version: str, now: float, doing: str) -> None:
    """Raises the ContractError of :func:`untrusted`, its message starting with ``doing``."""
    exc = untrusted(store, model, version, now)
    if exc is not None:
        raise type(exc)(f"{doing}: {exc}. Choose another version, or build the model again with a current key "
                        "and publish it as a new version")


def _previous_warning(store: Store, model: str, previous: str | None, now: float, why: str) -> Decision | None:
    """A ``warning`` decision when ``previous`` (where a revert sends devices) is no longer trusted; None when it
    is, when there is none, or when it cannot be judged (not published here, unusable keys: logged). Never
    raises a refusal: reverting to the previous version is how an operator recovers."""
    if previous is None:
        return None
    try:
        exc = untrusted(store, model, previous, now)
    except FleetError as err:
        log.warning("previous version %s %s not judged: %s", model, previous, err)
        return None
    if exc is None:
        return None
    detail = (f"{why} {model} {previous} ({exc.reason}): {exc}. Devices still holding it in their standby slot may "
              "switch back to it (a switch back checks its expiry and files, not its signature); the others refuse "
              "to install it")
    log.warning("%s", detail)
    return Decision("warning", detail, evidence={"version": previous, "reason": exc.reason})


def _record_warning_in(c: Any, rollout_id: str, warning: Decision | None, now: float) -> None:
    if warning is not None:
        _decide(c, rollout_id, warning, now)


def _pause_untrusted(r: Rollout, why: ContractError) -> StepResult:
    """Pause ``r``, whose version devices no longer trust, before it asks another device to move."""
    r.state = "paused"
    then = (f"abort to send the {len(r.targeted)} device(s) it moved back to {r.previous}" if r.previous else
            "abort it to end it")
    detail = f"paused ({why.reason}): {why}. No more devices are asked to move to it; {then}"
    log.warning("rollout %s %s", r.id, detail)
    return StepResult(decisions=[Decision("pause", detail, evidence={"version": r.version, "reason": why.reason})])


# ---- operator actions -----------------------------------------------------------------------------------------
def start(store: Store, *, model: str, version: str, cohort: Mapping[str, str] | None, stages: str | list[float],
          bake_seconds: float, max_per_minute: int = 0, window: str = "", thresholds: Mapping[str, float] | None = None,
          approve_stages: list[int] | None = None, actor: str = "operator", previous: str | None = None,
          now: float | None = None, names: Mapping[str, str] = params.BODY) -> str:
    """Create and start a rollout. Every parameter is checked here, types included, by :func:`params.check` (the
    one check the CLI and the API share: the API passes the body's values as they came), its errors naming the
    parameter as ``names`` spells it (:data:`params.BODY` fields or :data:`params.FLAGS`). With stage 1 in
    ``approve_stages`` the rollout starts ``awaiting_approval`` and moves nothing until approved.

    The version is judged as devices judge it (module docstring: Trust); a previous version devices no longer
    trust is allowed and logged as a ``warning`` decision.

    Raises RequestError (a parameter breaks its rule), NotFoundError (version not published), ContractError
    (devices refuse the version: ``reason`` ``revoked_key``, ``expired``, ...), ConfigError (the root key or the
    stored keyset is unusable), ConflictError (another rollout of this model is active)."""
    now = now or time.time()
    p = params.check(cohort=cohort, stages=stages, bake_seconds=bake_seconds, max_per_minute=max_per_minute,
                     window=window, thresholds=thresholds, approve_stages=approve_stages, names=names)
    row = version_row(store, model, version)
    cohort_name = names.get("cohort", "cohort")
    fleet = _devices(store)
    _check_cohort_matches(fleet, p.cohort, cohort_name)
    members = [d for d, tags in fleet if in_cohort(tags, p.cohort)]
    reported = _reported(store)
    _check_targets(reported, members, row, "cannot start a rollout", cohort_name)
    _require_trusted(store, model, version, now, "cannot start a rollout")
    if previous is None:
        versions = Counter((reported.get(d) or {}).get("active", {}).get("version") for d in members
                           if ((reported.get(d) or {}).get("active") or {}).get("name") == model)
        versions.pop(version, None)
        versions.pop(None, None)
        previous = versions.most_common(1)[0][0] if versions else None
    warning = _previous_warning(store, model, previous, now, "an abort or automatic rollback would send devices back "
                                "to")
    rid = "r-" + secrets.token_hex(4)
    state = "awaiting_approval" if 1 in p.approve_stages else "running"
    with store.write() as c:  # the check and the insert in one transaction: two racing starts, one rollout
        active = c.execute("SELECT id FROM rollouts WHERE model = ? AND state IN ('running', 'paused', "
                           "'awaiting_approval')", (model,)).fetchone()
        if active is not None:
            raise ConflictError(f"rollout {active['id']} of {model} is still active; pause, abort or wait for it")
        c.execute("INSERT INTO rollouts VALUES (?, 'rollout', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0, ?, '[]', "
                  "'{}', ?, ?, ?)",
                  (rid, model, version, previous, json.dumps(p.cohort, sort_keys=True), json.dumps(p.stages),
                   p.bake_seconds, p.max_per_minute, p.window, json.dumps(p.thresholds),
                   json.dumps([s - 1 for s in p.approve_stages]), state, now, now, actor, now))
        _decide(c, rid, Decision("start", f"rollout of {model} {version} (previous {previous or 'none'}) to cohort "
                                 f"{p.cohort or 'all devices'} in stages {p.stages}", actor=actor), now)
        if warning is not None:
            _decide(c, rid, warning, now)
        if state == "awaiting_approval":
            _decide(c, rid, Decision("await_approval", "stage 1 needs an operator's approval before any device "
                                     "moves"), now)
    return rid


ACTIONS = ("pause", "resume", "abort", "approve")  # what an operator can do to a rollout (set_state)


def set_state(store: Store, signer: DesiredSigner, rollout_id: str, action: str, actor: str,
              now: float | None = None) -> dict[str, Any]:
    """pause | resume | abort | approve (:data:`ACTIONS`). Abort sends every moved device back to the previous
    version, trusted or not (a ``warning`` decision when devices no longer trust it: module docstring).

    Read, checked and saved in one write transaction, so two operators' actions (or an action and the engine's
    tick) cannot overwrite each other. Raises NotFoundError for an action that is none of these (checked first,
    whatever the rollout's state: ``POST /api/v1/rollouts/ID/explode`` names no operation, so it is a 404 listing
    the actions, as an unknown path would be) or an unknown rollout; ConflictError when the rollout's state does
    not allow the action (pausing a paused rollout included: it would change nothing).

    Returns :func:`status` with ``message``: what the action did, in words (an approved stage starts at the
    engine's next tick, so the state is still ``awaiting_approval`` when this returns)."""
    if action not in ACTIONS:
        raise NotFoundError(f"no rollout action {action!r}; the actions are {', '.join(ACTIONS)}")
    now = now or time.time()
    with store.write() as c:  # the action, its log and the desired states an abort sends: all or none
        r = get(store, rollout_id)  # this thread's connection: read inside the transaction
        revert = _apply(r, rollout_id, action)
        _save(c, r, now)
        detail = f"{action} by {actor}" + (f"; sending {len(revert)} device(s) back to {r.previous}"
                                           if revert and r.previous else "")
        _decide(c, r.id, Decision(action, detail, actor=actor), now)
        if revert and r.previous:
            _record_warning_in(c, r.id, _previous_warning(store, r.model, r.previous, now, "the abort sends "
                                                          f"{len(revert)} device(s) back to"), now)
            write_desired(c, signer, version_row(store, r.model, r.previous), revert, r.model, r.previous, r.id,
                          f"abort of rollout {r.id}", now)
    return {**status(store, rollout_id), "message": _said(r, action, revert)}


def _said(r: Rollout, action: str, revert: list[str]) -> str:
    """What ``action`` did to ``r`` (after :func:`_apply`), for the operator who asked."""
    if action == "approve":
        return f"approved stage {r.stage + 1}; the engine moves its devices at its next tick"
    if action == "resume":
        return f"resumed: {r.state.replace('_', ' ')}"
    if action == "abort":
        return (f"aborted; sending {len(revert)} device(s) back to {r.previous}" if revert and r.previous
                else "aborted")
    return "paused; no more devices are asked to move until it is resumed"


def _apply(r: Rollout, rollout_id: str, action: str) -> list[str]:
    """Change ``r`` for ``action``; the devices to send back (abort). Raises ConflictError, NotFoundError."""
    if r.state in TERMINAL:
        raise ConflictError(f"rollout {rollout_id} is {r.state}; nothing to {action}")
    revert: list[str] = []
    if action == "pause":
        if r.state == "paused":
            raise ConflictError(f"rollout {rollout_id} is already paused; resume it to go on, or abort it")
        r.state = "paused"
    elif action == "resume":
        if r.state != "paused":
            raise ConflictError(f"rollout {rollout_id} is {r.state}, not paused")
        needs_approval = r.stage in r.approve_stages and r.stage not in r.approved
        r.state = "awaiting_approval" if needs_approval else "running"
    elif action == "approve":
        if r.state != "awaiting_approval":
            raise ConflictError(f"rollout {rollout_id} is {r.state}; nothing awaits approval")
        r.approved.append(r.stage)
    elif action == "abort":
        r.state = "aborted"
        revert = sorted(r.targeted)
    else:
        raise NotFoundError(f"no rollout action {action!r}; the actions are {', '.join(ACTIONS)}")
    return revert


def rollback(store: Store, signer: DesiredSigner, model: str, to_version: str, cohort: Mapping[str, str] | None,
             actor: str, now: float | None = None, cohort_name: str = "cohort") -> str:
    """Send every cohort device running ``model`` back to ``to_version`` (no gates: an operator decision). The
    version is judged as devices judge it (module docstring: Trust), but a rollback is how an operator recovers:
    to a version devices no longer trust it goes ahead, with a ``warning`` decision, when every targeted device
    holds it in its standby slot or runs it (a switch back checks expiry and files, not the signature), and is
    refused when a device would have to download it (it would refuse it).

    A device moves back only to the version it holds in its standby slot (or forward to a newer one), so the
    cohort's devices are checked against their reported slots first: when some of them run a newer ``model``
    and do not hold ``to_version`` in standby, they would refuse it and stay pending for ever, so nothing is sent
    and the rollback is refused naming them. Devices that have not reported are not judged (they judge for
    themselves). The rollback's decision says how many devices switch to the version held in standby, already
    run it, or install it as a newer version.

    Raises RequestError when ``cohort`` is not an object of tags (named as ``cohort_name`` spells it),
    NotFoundError when the version is not published, ContractError when devices refuse it (``reason``
    ``revoked_key``, ``expired``, ...), ConflictError when cohort devices would refuse to move back to it (above),
    ConfigError when the root key or the stored keyset is unusable."""
    now = now or time.time()
    cohort = params.check_cohort(cohort, cohort_name)
    version_row(store, model, to_version)
    distrust = untrusted(store, model, to_version, now)
    fleet = _devices(store)
    _check_cohort_matches(fleet, cohort, cohort_name)
    devices = [d for d, tags in fleet if in_cohort(tags, cohort)]
    reported = _reported(store)
    _check_targets(reported, devices, version_row(store, model, to_version), f"cannot roll {model} back to "
                   f"{to_version}", cohort_name)
    moves = _moves_back(reported, devices, model, to_version)
    refusing = moves.pop("refuses", [])
    warning = None
    if distrust is not None:
        # A switch back to the standby slot checks the version's expiry and files, not its signature: a rollback
        # is how an operator recovers, so it may go to a version signed by a key revoked since, for the devices
        # that hold it; a device that would have to download it refuses it, so then nothing is sent.
        fetching = moves.get("installs", []) + moves.get("unknown", [])
        if fetching:
            raise type(distrust)(
                f"cannot roll {model} back to {to_version}: {distrust}; {len(fetching)} device(s) would have to "
                f"download it and refuse it ({', '.join(fetching[:10])}{' ...' if len(fetching) > 10 else ''}). "
                "Narrow the cohort to the devices holding it in standby, or publish a fixed version signed by a "
                "current key")
        warning = Decision("warning", f"rolled back to {model} {to_version}, which devices no longer trust "
                           f"({distrust.reason}): {distrust}; every targeted device holds it in its standby slot or "
                           "runs it", evidence={"version": to_version, "reason": distrust.reason})
    if refusing:
        shown = ", ".join(f"{d} {_slots_text(reported[d])}" for d in refusing[:10]) + (
            f" and {len(refusing) - 10} more" if len(refusing) > 10 else "")
        raise ConflictError(
            f"cannot roll {model} back to {to_version}: {len(refusing)} of {len(devices)} device(s) run a newer "
            f"version and do not hold {to_version} in their standby slot, so they would refuse it ({shown}). "
            f"Narrow {cohort_name} to leave them out, or choose the version they hold in standby "
            "(`fleet-server devices show ID` shows a device's slots)")
    forward = [d for d in moves.get("installs", []) if ((reported.get(d) or {}).get("active") or {}).get("name")
               == model]  # runs an older version of this model (not nothing, not another model)
    if forward and not moves.get("standby") and not moves.get("unknown") and not moves.get("already"):
        # No reported device would go back or already runs it: every one would install it as a newer version.
        # That is a rollout without its stages and gates (found by a README walkthrough audit), so it is refused.
        # (With devices already on it, a rollback also cancels a newer desired state pending for them: allowed.)
        whose = " of the cohort" if cohort else ""
        raise ConflictError(
            f"nothing to roll back: no device{whose} runs a {model} newer than {to_version} "
            f"({len(forward)} would install it as a newer version); a rollback only goes back. To move devices "
            f"forward, start a rollout of {to_version} (`fleet-server rollout start {model} {to_version}`), with its "
            "stages and gates")
    counts = {k: len(v) for k, v in moves.items() if v}
    rid = "rb-" + secrets.token_hex(4)
    with store.write() as c:
        c.execute("INSERT INTO rollouts VALUES (?, 'rollback', ?, ?, NULL, ?, '[100]', 0, 0, '', '{}', '[]', "
                  "'completed', 0, ?, '[]', ?, ?, ?, ?)",
                  (rid, model, to_version, json.dumps(cohort, sort_keys=True), now,
                   json.dumps({d: now for d in devices}), now, actor, now))
        _decide(c, rid, Decision("rollback", f"{actor} rolled {model} back to {to_version} on {len(devices)} "
                                 f"device(s): {_moves_text(counts)}", actor=actor,
                                 evidence={"devices": devices, "moves": counts}), now)
        if warning is not None:
            _decide(c, rid, warning, now)
        # Devices on another model are left alone; aborting active rollouts of this model (in the same
        # transaction) keeps them from undoing it.
        for row in c.execute("SELECT id FROM rollouts WHERE model = ? AND state IN ('running', 'paused', "
                             "'awaiting_approval')", (model,)).fetchall():
            r = get(store, row["id"])
            r.state = "aborted"
            _save(c, r, now)
            _decide(c, r.id, Decision("abort", f"superseded by rollback {rid}", actor=actor), now)
        write_desired(c, signer, version_row(store, model, to_version), devices, model, to_version, rid,
                      f"rollback by {actor}", now)
    return rid


def _moves_back(reported: Mapping[str, dict[str, Any]], devices: list[str], model: str,
                version: str) -> dict[str, list[str]]:
    """``devices`` by how each would take ``model`` ``version`` (the device's own rule, ``check_move``):
    ``already`` runs it, ``standby`` switches to it from its standby slot, ``installs`` it (newer than what it
    runs, another model or nothing), ``refuses`` it (runs a newer one and does not hold it), ``unknown`` (no
    report, or versions that cannot be compared)."""
    out: dict[str, list[str]] = {"already": [], "standby": [], "installs": [], "refuses": [], "unknown": []}
    for dev in devices:
        rep = reported.get(dev) or {}
        active, standby = rep.get("active") or {}, rep.get("standby") or {}
        if not rep:
            kind = "unknown"
        elif active.get("name") != model:
            kind = "installs"
        elif active.get("version") == version:
            kind = "already"
        elif (standby.get("name"), standby.get("version")) == (model, version):
            kind = "standby"
        else:
            try:
                kind = "installs" if is_newer(version, str(active.get("version"))) else "refuses"
            except ContractError:
                kind = "unknown"
        out[kind].append(dev)
    return out


def _slots_text(rep: Mapping[str, Any]) -> str:
    active, standby = rep.get("active") or {}, rep.get("standby") or {}
    held = f"{standby.get('name')} {standby.get('version')}" if standby else "nothing"
    return f"(runs {active.get('version')}, holds {held} in standby)"


def _moves_text(counts: Mapping[str, int]) -> str:
    words = {"standby": "switch to it from their standby slot", "already": "already run it",
             "installs": "install it as a newer version", "unknown": "have not reported (they judge for themselves)"}
    return "; ".join(f"{counts[k]} {w}" for k, w in words.items() if counts.get(k)) or "no devices"


# ---- desired state -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DesiredSigner:
    """The fleet key that signs desired states and the base URL devices download packages from."""

    key: Ed25519PrivateKey
    base_url: str

    @classmethod
    def from_settings(cls, settings: ServerSettings) -> DesiredSigner:
        """Raises SchemaError when the data folder's fleet key is unreadable."""
        return cls(load_private_key(settings.fleet_key), settings.base_url())


def set_desired(store: Store, signer: DesiredSigner, devices: list[str], model: str, version: str,
                rollout_id: str, reason: str, now: float) -> None:
    """Ask ``devices`` to move to ``model`` ``version``, in a transaction of its own."""
    if not devices:
        return
    row = version_row(store, model, version)
    with store.write() as c:
        write_desired(c, signer, row, devices, model, version, rollout_id, reason, now)


def write_desired(c: Any, signer: DesiredSigner, row: Any, devices: list[str], model: str, version: str,
                  rollout_id: str, reason: str, now: float) -> None:
    """Write the signed desired states of ``devices`` in the caller's write transaction ``c`` (``row``: the
    version's ``model_versions`` row), so that a rollout's step and the desired states it asks for commit
    together: a server killed between the two left a stage's devices counted as asked and never asked."""
    key, base = signer.key, signer.base_url
    issued = datetime.fromtimestamp(now, UTC).replace(microsecond=0)
    # A revoked (or removed) device is never sent a desired state, whichever path asks (a stage, an abort's or an
    # automatic rollback's revert of the devices a rollout moved): read in the transaction that writes, so a
    # revocation committed between the caller's read and this write is honoured too.
    fleet = {r[0] for r in c.execute("SELECT device_id FROM devices WHERE revoked IS NULL")}
    for dev in devices:
        if dev not in fleet:
            continue
        prev = c.execute("SELECT seq FROM desired WHERE device_id = ?", (dev,)).fetchone()
        seq = (prev["seq"] if prev else 0) + 1
        d = Desired(device_id=dev, seq=seq, name=model, version=version,
                    url=f"{base}/packages/{model}/{version}", sha256=row["sha256"], length=row["length"],
                    issued=issued, expires=issued + DESIRED_LIFETIME, rollout=rollout_id, reason=reason)
        c.execute("INSERT INTO desired VALUES (?, ?, ?, ?, ?, ?, ?, 0) ON CONFLICT(device_id) DO UPDATE SET "
                  "seq=excluded.seq, model=excluded.model, version=excluded.version, rollout=excluded.rollout, "
                  "envelope=excluded.envelope, updated=excluded.updated, published=0",
                  (dev, seq, model, version, rollout_id, json.dumps(sign_desired(d, key)), now))


# ---- snapshots ------------------------------------------------------------------------------------------------
def _p95(latency_counts: np.ndarray) -> float | None:
    total = latency_counts.sum()
    if total == 0:
        return None
    i = int(np.searchsorted(np.cumsum(latency_counts), 0.95 * total))
    edges = LATENCY_EDGES_MS
    return float(edges[i]) if i < len(edges) else float(edges[-1]) * 2


def _group(store: Store, model: str, version: str, devices: list[str], since: float) -> GroupStats:
    g = GroupStats()
    if not devices:
        return g
    lat = np.zeros(len(LATENCY_EDGES_MS) + 1, dtype=np.int64)
    cal = 0.0
    seen = set()
    marks = ",".join("?" * len(devices))
    for row in store.query(f"SELECT device_id, body FROM summaries WHERE model = ? AND version = ? AND received >= ?"
                           f" AND device_id IN ({marks})", (model, version, since, *devices)):
        b = json.loads(row["body"])
        seen.add(row["device_id"])
        n = int(b["window"]["count"])
        g.predictions += n
        g.errors += int(b["ops"]["errors"].get("inference", 0))
        lat += np.asarray(b["ops"]["latency_counts"], dtype=np.int64)
        cal += float(sum(b["output"]["calibrated_sum"]))
    g.devices = len(seen)
    g.p95_ms = _p95(lat)
    g.est_accuracy = cal / g.predictions if g.predictions else None
    return g


# Outcomes the device retries by itself: not a verdict on the version.
TRANSIENT = ("download_interrupted", "interrupted", "busy", "maintenance_window", "no_space", "in_probation",
             "io_error")


def _install_failed(last_result: dict[str, Any], version: str, asked: float | None = None) -> bool:
    """Did this device's last result condemn ``version``? For a rollback the result's ``version`` is the one
    switched back to and ``details.from`` the one abandoned.

    ``asked``: when this rollout asked the device to move (``Rollout.targeted``). A result the device recorded
    before then (its ``at``, second precision, device clock) is about an earlier attempt, e.g. the rollback an
    abort caused, and does not count; a result without a readable ``at`` counts."""
    status = last_result.get("status")
    if asked is not None and _result_before(last_result, asked):
        return False
    if last_result.get("reason") in TRANSIENT:
        return False
    if status in ("rolled_back", "rollback_failed"):
        frm = (last_result.get("details") or {}).get("from") or {}
        return bool(frm.get("version") == version or last_result.get("version") == version)
    return last_result.get("version") == version and status in ("rejected", "failed")


def _result_before(last_result: dict[str, Any], asked: float) -> bool:
    """Was ``last_result`` recorded before ``asked`` (a server time)? False when its ``at`` is missing or
    unreadable. ``at`` has whole seconds, so a result of the same second as ``asked`` is not before it."""
    try:
        at = parse(last_result.get("at"), "last_result.at").timestamp()
    except ContractError:
        return False
    return at < int(asked)


def snapshot(store: Store, r: Rollout, stage_members: list[str]) -> Snapshot:
    reported = _reported(store)
    moved = [d for d in stage_members if d in r.targeted]
    on_new = [d for d in moved if ((reported.get(d) or {}).get("active") or {}).get("version") == r.version]
    failures = sum(1 for d in moved if _install_failed((reported.get(d) or {}).get("last_result") or {}, r.version,
                                                       r.targeted[d]))
    control = [d for d, tags in _devices(store) if in_cohort(tags, r.cohort) and d not in r.targeted
               and ((reported.get(d) or {}).get("active") or {}).get("version") == r.previous]
    since = r.stage_started
    return Snapshot(targeted=len(moved), reporting_new=len(on_new), install_failures=failures,
                    new=_group(store, r.model, r.version, on_new, since),
                    control=_group(store, r.model, r.previous or "", control, since))


# ---- the loop ---------------------------------------------------------------------------------------------
class RolloutService:
    def __init__(self, settings: ServerSettings, store: Store, *, tick_seconds: float = 1.0) -> None:
        self.settings = settings
        self.store = store
        self.tick_seconds = tick_seconds
        self.publisher: MqttPublisher | None = None  # set when the app starts with a broker
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0
        self.signer = DesiredSigner.from_settings(settings)
        self._publisher_connects = 0  # the publisher's connections whose desired states were all published

    def tick(self, now: float | None = None) -> None:
        now = now or time.time()
        for row in self.store.query("SELECT id FROM rollouts WHERE state IN ('running', 'awaiting_approval')"):
            try:
                self._step_one(row["id"], now)
            except Exception:  # one rollout's failure never stops the others' steps (logged, counted)
                self.errors += 1
                log.exception("rollout %s: its step failed; the other rollouts go on", row["id"])
        self.publish_pending()

    def _step_one(self, rollout_id: str, now: float) -> None:
        """One engine step of one active rollout, saved with its decisions and desired states (or not at all)."""
        r = get(self.store, rollout_id)
        members = stage_devices(r.model, _rollout_devices(self.store, r), r.cohort, r.stages[r.stage])
        # built only if the gates are judged on this step: it parses every summary of the stage so far (0.4 s
        # with 89 of 1,000 devices on the new version, growing with every device and minute)
        res = step(r, members, functools.partial(snapshot, self.store, r, members), now)
        # judged on the steps that move devices only: each reads the whole package (60 ms for 40 MB)
        if res.to_target and (why := untrusted(self.store, r.model, r.version, now)) is not None:
            fresh = get(self.store, r.id)  # the step is dropped: no device is asked to move
            if fresh.updated != r.updated:
                return  # an operator acted since it was read: judged again on the next tick
            r, res = fresh, _pause_untrusted(fresh, why)
        target_row = version_row(self.store, r.model, r.version) if res.to_target else None
        revert = res.to_revert if r.previous else []
        revert_row = version_row(self.store, r.model, r.previous) if revert and r.previous else None
        warning = _previous_warning(self.store, r.model, r.previous, now, f"the automatic rollback sends "
                                    f"{len(revert)} device(s) back to") if revert and r.previous else None
        with self.store.write() as c:  # the step, its log and the desired states it asks for: all or none
            stored = c.execute("SELECT updated FROM rollouts WHERE id = ?", (r.id,)).fetchone()
            if stored is None or stored["updated"] != r.updated:
                return  # an operator acted since it was read: judged again on the next tick
            _save(c, r, now)
            for d in res.decisions:
                _decide(c, r.id, d, now)
            if target_row is not None:
                write_desired(c, self.signer, target_row, res.to_target, r.model, r.version, r.id,
                              f"rollout {r.id} stage {r.stage + 1}", now)
            if revert_row is not None and r.previous:
                if warning is not None:
                    _decide(c, r.id, warning, now)
                write_desired(c, self.signer, revert_row, revert, r.model, r.previous, r.id,
                              f"automatic rollback of {r.id}", now)

    def publish_pending(self) -> int:
        """Publish the desired states not yet acknowledged by the broker; after the publisher (re)connected, every
        desired state again (retained: a device gets its latest on connecting; it ignores a sequence number it
        has seen). The broker may have lost what it had acknowledged (``MqttPublisher.connects``)."""
        if self.publisher is None:
            return 0
        connects = self.publisher.connects
        if connects != self._publisher_connects:
            with self.store.write() as c:
                c.execute("UPDATE desired SET published = 0 WHERE published = 1")
            self._publisher_connects = connects
        # Published and marked in batches of up to 200, not one write transaction (competing with the ingest
        # writer) per device.
        done: list[tuple[str, int]] = []

        def mark() -> None:
            if done:
                with self.store.write() as c:
                    c.executemany("UPDATE desired SET published = 1 WHERE device_id = ? AND seq = ?", done)
                done.clear()

        rows = self.store.query("SELECT device_id, envelope, seq FROM desired WHERE published = 0")
        sent = 0
        for i in range(0, len(rows), 200):
            chunk = rows[i:i + 200]
            messages = [(topic(self.settings.fleet, r["device_id"], "desired"), r["envelope"]) for r in chunk]
            oks = self.publisher.publish_many(messages)  # the batch in flight at once
            done.extend((r["device_id"], r["seq"]) for r, ok in zip(chunk, oks, strict=True) if ok)
            sent += sum(oks)
            mark()
        return sent

    def _run(self) -> None:
        while not self._stop.wait(self.tick_seconds):
            try:
                self.tick()
            except Exception:  # a bad tick is logged and counted; the next one retries
                self.errors += 1
                log.exception("rollout tick failed")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rollouts", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
