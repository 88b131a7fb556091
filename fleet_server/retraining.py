"""Retraining cadence: tell the owner when a model is due, and run its optional retraining hook.

A model with ``retrain_every_s`` is due at ``last_retrained + retrain_every_s`` (publishing a version moves
``last_retrained``). When that time has passed, :func:`check_due` raises ONE ``retraining_due`` alert per due
period (its dedup key holds the due time, so neither a later evaluation nor a resolution by hand raises it
again) — it goes to the owner's on-call route through the same delivery path as every alert — records a
``retraining_due`` event and returns a :class:`HookRun` when ``models.retrain_hook`` is set. Once the model is
retrained (no longer due), open ``retraining_due`` alerts resolve automatically.

With ``retrain_on_drift``, a newly opened input- or output-drift alert also asks for the hook
(:func:`on_drift_alerts`).

:func:`run_hook` runs the command split with ``shlex`` (never through a shell), with a timeout, with
``EDGEFLEET_MODEL``, ``EDGEFLEET_VERSION``, ``EDGEFLEET_REASON`` and ``EDGEFLEET_ALERT_ID`` in its
environment, and records its exit status (or the timeout) in ``events`` as ``retrain_hook``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import time
from dataclasses import dataclass
from typing import Any

from edgefleet_contracts.timeutil import duration_text

from .alerts import dedup_key, raise_alert, record_event
from .errors import RequestError, did_you_mean
from .health import fmt_epoch
from .store import Store

HOOK_TIMEOUT_S = 600.0
DRIFT_KINDS = ("input_drift", "output_drift")


@dataclass(frozen=True)
class HookRun:
    model: str
    version: str | None
    command: str
    reason: str  # "due" | "drift"
    alert_id: int | None


def _latest_version(store: Store, model: str) -> str | None:
    r = store.one("SELECT version FROM model_versions WHERE name = ? ORDER BY published DESC LIMIT 1", (model,))
    return None if r is None else str(r["version"])


def check_due(store: Store, now: float | None = None) -> list[HookRun]:
    """Raise the retraining-due alert of every model past its cadence (once per due period) and resolve
    those of models no longer due. Returns the hooks to run."""
    now = time.time() if now is None else now
    runs: list[HookRun] = []
    for m in store.query("SELECT * FROM models WHERE retrain_every_s IS NOT NULL AND retrain_every_s > 0"):
        name = m["name"]
        due_at = (m["last_retrained"] or m["created"]) + m["retrain_every_s"]
        with store.write() as c:
            if due_at > now:
                for r in c.execute("SELECT id FROM alerts WHERE model = ? AND kind = 'retraining_due'"
                                   " AND state IN ('open', 'acknowledged')", (name,)).fetchall():
                    c.execute("UPDATE alerts SET state = 'resolved', updated = ?, delivery_state = 'pending',"
                              " delivery_attempts = 0, delivery_error = NULL, next_attempt = ? WHERE id = ?",
                              (now, now, r["id"]))
                    record_event(c, now, "alert_resolved", name, {"id": r["id"], "by": "auto", "reason": "retrained"})
                continue
            scope = f"due@{fmt_epoch(due_at)}"
            if c.execute("SELECT 1 FROM alerts WHERE dedup_key = ?",
                         (dedup_key(name, None, "retraining_due", scope),)).fetchone():
                continue  # already raised for this due period
            version = _latest_version(store, name)
            every = duration_text(m["retrain_every_s"])
            summary = (f"{name}: retraining due since {fmt_epoch(due_at)} (every {every}; last retrained "
                       f"{fmt_epoch(m['last_retrained'] or m['created'])})")
            evidence: dict[str, Any] = {"due_at": fmt_epoch(due_at), "retrain_every_s": m["retrain_every_s"],
                                        "last_retrained": m["last_retrained"], "latest_version": version,
                                        "hook": m["retrain_hook"]}
            what, alert_id = raise_alert(c, name, None, "retraining_due", scope, summary, evidence, now, 0.0)
            record_event(c, now, "retraining_due", name, {"alert_id": alert_id, **evidence})
        if what == "opened" and m["retrain_hook"]:
            runs.append(HookRun(name, version, m["retrain_hook"], "due", alert_id))
    return runs


def on_drift_alerts(store: Store, alert_ids: list[int]) -> list[HookRun]:
    """Hooks to run for newly opened drift alerts of models with ``retrain_on_drift`` (one per model)."""
    if not alert_ids:
        return []
    marks = ",".join("?" * len(alert_ids))
    rows = store.query(
        f"SELECT a.id, a.model, a.version, a.kind, m.retrain_hook FROM alerts a JOIN models m ON m.name = a.model"
        f" WHERE a.id IN ({marks}) AND m.retrain_on_drift = 1 AND m.retrain_hook IS NOT NULL AND m.retrain_hook != ''"
        f" ORDER BY a.id", tuple(alert_ids))
    runs: dict[str, HookRun] = {}
    for r in rows:
        if r["kind"] in DRIFT_KINDS and r["model"] not in runs:
            runs[r["model"]] = HookRun(r["model"], r["version"], r["retrain_hook"], "drift", r["id"])
    return list(runs.values())


def run_hook(store: Store, run: HookRun, timeout_s: float = HOOK_TIMEOUT_S) -> int | None:
    """Run the hook (argv from ``shlex.split``; no shell) and record a ``retrain_hook`` event. Returns the exit
    status, or None when it could not start or timed out (the event says which)."""
    t0 = time.monotonic()
    env = {**os.environ, "EDGEFLEET_MODEL": run.model, "EDGEFLEET_VERSION": run.version or "",
           "EDGEFLEET_REASON": run.reason, "EDGEFLEET_ALERT_ID": str(run.alert_id or "")}
    detail: dict[str, Any] = {"command": run.command, "reason": run.reason, "alert_id": run.alert_id,
                              "version": run.version}
    status: int | None = None
    try:
        argv = shlex.split(run.command)
        if not argv:
            raise ValueError("empty command")
        proc = subprocess.run(argv, env=env, capture_output=True, timeout=timeout_s, check=False,
                              stdin=subprocess.DEVNULL)
        status = proc.returncode
        detail.update(exit_status=status, stdout_tail=proc.stdout[-2000:].decode(errors="replace"),
                      stderr_tail=proc.stderr[-2000:].decode(errors="replace"))
    except subprocess.TimeoutExpired:
        detail.update(exit_status=None, timed_out=True, error=f"no exit after {timeout_s:g} s; killed")
    except (OSError, ValueError) as exc:
        detail.update(exit_status=None, error=f"could not start: {exc}")
    detail["seconds"] = round(time.monotonic() - t0, 3)
    with store.write() as c:
        record_event(c, time.time(), "retrain_hook", run.model, detail)
    return status


# Every kind of row the ``events`` table holds (``store.record_event`` callers and the ``device_state`` trigger;
# a test keeps this in step with the code). Listing by another kind is refused rather than answered "no events".
EVENT_KINDS = ("alert_opened", "alert_acknowledged", "alert_resolved", "alert_delivery_failed", "retraining_due",
               "retrain_hook", "token", "device", "device_state")


def events(store: Store, kind: str | None = None, subject: str | None = None, limit: int = 100
           ) -> list[dict[str, Any]]:
    """Recent events, newest first (retraining, hooks, alert transitions; device state changes, which are the
    dashboard's device history, only when asked for by ``kind="device_state"``). Raises RequestError when
    ``kind`` is not one of :data:`EVENT_KINDS` (the message lists them)."""
    if kind and kind not in EVENT_KINDS:
        raise RequestError(f"unknown event kind {kind!r}{did_you_mean(kind, EVENT_KINDS)}; the kinds "
                           f"are {', '.join(EVENT_KINDS)}")
    sql, args = "SELECT * FROM events WHERE 1 = 1", []
    if kind:
        sql += " AND kind = ?"
        args.append(kind)
    else:
        sql += " AND kind != 'device_state'"
    if subject:
        sql += " AND subject = ?"
        args.append(subject)
    rows = store.query(sql + " ORDER BY id DESC LIMIT ?", (*args, limit))
    return [{"id": r["id"], "at": fmt_epoch(r["at"]), "kind": r["kind"], "subject": r["subject"],
             "detail": json.loads(r["detail"])} for r in rows]


__all__ = ["EVENT_KINDS", "HOOK_TIMEOUT_S", "HookRun", "check_due", "events", "on_drift_alerts", "run_hook"]
